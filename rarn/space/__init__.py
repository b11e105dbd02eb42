"""The search space, the ground floor of ``rarn``: the op registry (``ops``: ``OPS``,
``PRIMITIVES``, ``PARAMETRIC``, the op modules) and architectures as data (``genotype``: the
frozen ``Genotype``, the bundled published genotypes, random genotypes).

It imports no other ``rarn`` room; ``models``, ``lipschitz`` and ``nas`` build on it.
"""
