"""rarn: RACL (Adversarially Robust Neural Architectures, Dong et al., TPAMI 2025) in PyTorch.

Submodules: ``config``, ``data``, ``search_space``, ``genotype``, ``supernet`` (+ ``fused``),
``lipschitz``, ``constraint``, ``search``, ``network``, ``training``, ``attacks``,
``evaluation``. Import them directly (``from rarn.search import run_search``); this package never
imports ``ray`` or ``mlflow``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
