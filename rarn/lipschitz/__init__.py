"""Lipschitz bounds. ``rules``: the one table of per-layer rules, each with a search-time estimate
and a certified face; ``estimator``: the batched search-time estimate over the supernet's ops;
``certify``: the certified bound of a discrete network (and an empirical lower bound)."""
