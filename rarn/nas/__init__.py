"""The search space and the RACL search: op registry, genotypes and decoding, supernet, chance
constraint, and the search loop. Import the submodules directly (``rarn.nas.search`` …)."""
