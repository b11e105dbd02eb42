"""The Ray Tune / Ray Train / MLflow pipeline around :mod:`rarn` (entry point: ``pipeline/run.py``).

Importing the package sets the quiet defaults of :data:`pipeline.env.QUIET` (no usage
statistics, no MLflow telemetry) before any of its modules imports Ray or MLflow, so every entry
point gets them (``pipeline/run.py``, ``python -m pipeline.registry``, the benchmarks). The
loopback defaults are not set here: they are for a Ray instance the driver starts itself, and
:func:`pipeline.run.main` applies them before it imports Ray. What the user exported wins.
"""

import os as _os

from pipeline.env import QUIET as _QUIET

for _key, _value in _QUIET.items():
    _os.environ.setdefault(_key, _value)
