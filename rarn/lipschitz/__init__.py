"""Lipschitz bounds: the per-op rules, the search-time estimator over the supernet's ops, and the
certified bound of a discrete network."""
