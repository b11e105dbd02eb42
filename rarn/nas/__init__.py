"""The search space and the RACL search: op registry (``ops``), genotypes (``genotype``) and
decoding (``decode``), supernet (``supernet`` + the private fused forward), chance constraint
(``constraint``), the search object (``search``) and its loop (``loop.run_search``)."""
