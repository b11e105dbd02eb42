"""A registered model anyone can load: weights, genotype and build arguments, no pickled code.

The retrained network is stored as three plain files: ``weights.pt`` (a ``state_dict`` of
tensors, read with ``torch.load(weights_only=True)``), ``genotype.json`` and ``network.json``
(the :class:`rarn.models.darts.Network` build arguments, the input shape and the sha256 of the
other two files). :func:`load_network` rebuilds the network from them; no file is unpickled and
no file of the model runs as code.

This file is also the MLflow *model code* of the pyfunc flavour (MLflow "models from code"):
:mod:`pipeline.model_store` logs it with the three files as ``artifacts`` and the ``rarn``
package as ``code_paths``, so ``mlflow.pyfunc.load_model("models:/NAME@champion")`` works in an
environment that has only torch and mlflow, also under
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. It therefore imports nothing from ``pipeline``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn

from rarn.models.darts import Network
from rarn.nas.genotype import Genotype

__all__ = ["FILES", "FORMAT", "RarnClassifier", "load_network", "network_spec", "save_network"]

FORMAT = "rarn.network/1"
FILES = {"weights": "weights.pt", "genotype": "genotype.json", "network": "network.json"}


class PortableModelError(ValueError):
    """The model files are incomplete, inconsistent or not a rarn network."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def network_spec(model: nn.Module) -> dict[str, Any]:
    """The :class:`Network` build arguments of ``model``, read from its structure.

    Raises:
        PortableModelError: ``model`` is not a :class:`rarn.models.darts.Network`.
    """
    if not isinstance(model, Network):
        raise PortableModelError(f"not a rarn Network: {type(model).__name__}")
    cell0 = model.cells[0]
    C = _first_conv(cell0.preprocess1).out_channels // (2 if cell0.reduction else 1)
    stem = model.stem if model.stem_type == "cifar" else model.stem0
    first = _first_conv(stem)
    return {
        "C": C,
        "num_classes": model.classifier.out_features,
        "layers": len(model.cells),
        "in_channels": first.in_channels,
        "auxiliary": model.aux_head is not None,
        "stem": model.stem_type,
        "stem_multiplier": first.out_channels // C if model.stem_type == "cifar" else 3,
    }


def save_network(model: nn.Module, dst: str | Path, example: torch.Tensor) -> dict[str, Path]:
    """Write the three files of ``model`` into ``dst``; returns ``{artifact name: path}``.

    The build arguments are checked by rebuilding the network and loading the weights into it
    (keys and shapes), so what is written is known to load.

    Args:
        model: a trained :class:`rarn.models.darts.Network`.
        dst: an existing or new folder.
        example: an input batch ``(B, C, H, W)``: its per-image shape is recorded.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    spec = network_spec(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _build(model.genotype, spec, state)  # fails here, not at load time, if the spec is wrong
    paths = {name: dst / file for name, file in FILES.items()}
    torch.save(state, paths["weights"])
    paths["genotype"].write_text(model.genotype.to_json())
    network = {
        "format": FORMAT,
        "build": spec,
        "input_shape": list(example.shape[1:]),
        "weights_sha256": _sha256(paths["weights"]),
        "genotype_sha256": model.genotype.sha256(),
    }
    paths["network"].write_text(json.dumps(network, indent=1, sort_keys=True))
    return paths


def _build(genotype: Genotype, spec: Mapping[str, Any], state: Mapping[str, Any]) -> Network:
    from rarn.checkpoint import load_state_checked

    net = Network(genotype, **spec)
    load_state_checked(net, state, what="registered model weights")
    return net.eval()


def load_network(files: Mapping[str, str | Path]) -> Network:
    """Rebuild the network from its three files (``{artifact name: path}``), on CPU, eval mode.

    ``network.json`` is read as JSON, the genotype through :class:`Genotype`'s checks, the
    weights with ``torch.load(weights_only=True)`` after their sha256 matched ``network.json``.

    Raises:
        PortableModelError: a file is missing, of another format, or does not match its digest.
    """
    missing = [name for name in FILES if name not in files or not Path(files[name]).is_file()]
    if missing:
        raise PortableModelError(f"model files missing: {missing}")
    meta = json.loads(Path(files["network"]).read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PortableModelError(f"{files['network']}: not a {FORMAT} file")
    genotype = Genotype.from_json(Path(files["genotype"]).read_text())
    if genotype.sha256() != meta["genotype_sha256"]:
        raise PortableModelError("genotype.json differs from the genotype recorded in network.json")
    digest = _sha256(Path(files["weights"]))
    if digest != meta["weights_sha256"]:
        raise PortableModelError(f"weights.pt has sha256 {digest}, network.json records another")
    state = torch.load(files["weights"], map_location="cpu", weights_only=True)
    return _build(genotype, meta["build"], state)


class RarnClassifier(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: images ``(B, C, H, W)`` float32 in [0, 1] -> logits ``(B, classes)``."""

    def load_context(self, context):  # no type hints: MLflow reads them as a schema
        self.model = load_network(context.artifacts)

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(x).numpy()


if __name__ != "pipeline.portable":  # run by MLflow as the model's code (models from code)
    mlflow.models.set_model(RarnClassifier())
