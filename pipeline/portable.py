"""A registered model anyone can load: weights, architecture and build arguments, no pickled code.

The retrained network is stored as plain files: ``weights.pt`` (a ``state_dict`` of tensors,
read with ``torch.load(weights_only=True)``), ``network.json`` (the kind of network, its build
arguments, the input shape and the sha256 of the other files) and, for a DARTS
:class:`rarn.models.darts.Network`, ``genotype.json``. Two kinds (``network.json`` ``kind``):

* ``darts``: rebuilt as ``Network(genotype, **build)``; ``network.json`` records
  ``genotype_sha256``. Files written before named networks existed have no ``kind`` and are this
  kind.
* ``baseline``: a named network of :data:`rarn.models.baselines.BASELINES` (``name``, e.g.
  ``resnet18``), rebuilt as ``BASELINES[name](**build)`` with ``build = {num_classes,
  in_channels}``; ``network.json`` records ``network_sha256``
  (:func:`rarn.models.baselines.baseline_sha256`); there is no ``genotype.json``.

:func:`load_network` rebuilds the network from them; no file is unpickled and no file of the
model runs as code.

This file is also the MLflow *model code* of the pyfunc flavour (MLflow "models from code"):
:mod:`pipeline.model_store` logs it with the files as ``artifacts`` and the ``rarn`` package as
``code_paths``, so ``mlflow.pyfunc.load_model("models:/NAME@champion")`` works in an environment
that has only torch and mlflow (and torchvision for a named network), also under
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. It therefore imports nothing from ``pipeline``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn

from rarn.models.baselines import BASELINES, baseline_sha256
from rarn.models.darts import Network
from rarn.space.genotype import Genotype

__all__ = [
    "FILES",
    "FORMAT",
    "RarnClassifier",
    "baseline_spec",
    "load_network",
    "network_spec",
    "save_network",
]

FORMAT = "rarn.network/1"
FILES = {"weights": "weights.pt", "genotype": "genotype.json", "network": "network.json"}
DARTS, BASELINE = "darts", "baseline"  # network.json "kind"


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


def baseline_spec(model: nn.Module) -> dict[str, int]:
    """A named network's build arguments (``num_classes``, ``in_channels``): the first conv's
    input channels and the last linear layer's outputs (checked by the rebuild on saving)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise PortableModelError(f"not a classifier with a linear head: {type(model).__name__}")
    return {"num_classes": linear[-1].out_features, "in_channels": _first_conv(model).in_channels}


def save_network(
    model: nn.Module, dst: str | Path, example: torch.Tensor, *, network: str = ""
) -> dict[str, Path]:
    """Write the files of ``model`` into ``dst``; returns ``{artifact name: path}``.

    The build arguments are checked by rebuilding the network and loading the weights into it
    (keys and shapes), so what is written is known to load.

    Args:
        model: a trained :class:`rarn.models.darts.Network`, or the named network ``network``.
        dst: an existing or new folder.
        example: an input batch ``(B, C, H, W)``: its per-image shape is recorded.
        network: a :data:`~rarn.models.baselines.BASELINES` name when ``model`` is that network
            (it cannot be read from the structure); empty for a DARTS network.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if network:
        spec: dict[str, Any] = baseline_spec(model)
        ident = {"kind": BASELINE, "name": network, "network_sha256": baseline_sha256(network)}
        genotype, names = None, ("weights", "network")
    else:
        spec = network_spec(model)
        ident = {"kind": DARTS, "genotype_sha256": model.genotype.sha256()}
        genotype, names = model.genotype, tuple(FILES)
    _build(_factory(ident, genotype), spec, state)  # fails here, not at load time, if wrong
    paths = {name: dst / FILES[name] for name in names}
    torch.save(state, paths["weights"])
    if genotype is not None:
        paths["genotype"].write_text(genotype.to_json())
    meta = {"format": FORMAT, "build": spec, "input_shape": list(example.shape[1:])}
    meta |= {"weights_sha256": _sha256(paths["weights"])} | ident
    paths["network"].write_text(json.dumps(meta, indent=1, sort_keys=True))
    return paths


def _factory(meta: Mapping[str, Any], genotype: Genotype | None) -> Callable[..., nn.Module]:
    """How ``network.json``'s kind is built from its build arguments."""
    if meta.get("kind", DARTS) == DARTS:
        return partial(Network, genotype)
    return BASELINES[meta["name"]]


def _build(
    make: Callable[..., nn.Module], spec: Mapping[str, Any], state: Mapping[str, Any]
) -> nn.Module:
    from rarn.checkpoint import load_state_checked

    net = make(**spec)
    load_state_checked(net, state, what="registered model weights")
    return net.eval()


def _missing(files: Mapping[str, str | Path], names: Any) -> None:
    missing = [name for name in names if name not in files or not Path(files[name]).is_file()]
    if missing:
        raise PortableModelError(f"model files missing: {missing}")


def _architecture(files: Mapping[str, str | Path], meta: Mapping[str, Any]) -> Genotype | None:
    """The genotype of a DARTS network (None for a named one), each checked against the digest
    ``network.json`` records."""
    kind = meta.get("kind", DARTS)  # absent: written before named networks
    if kind == BASELINE:
        name = meta.get("name")
        if name not in BASELINES:
            raise PortableModelError(f"unknown named network {name!r}; known: {list(BASELINES)}")
        if baseline_sha256(name) != meta.get("network_sha256"):
            raise PortableModelError(f"network.json: network_sha256 is not that of {name!r}")
        return None
    if kind != DARTS:
        raise PortableModelError(f"network.json: unknown kind {kind!r}; known: {DARTS}, {BASELINE}")
    _missing(files, FILES)
    genotype = Genotype.from_json(Path(files["genotype"]).read_text())
    if genotype.sha256() != meta["genotype_sha256"]:
        raise PortableModelError("genotype.json differs from the genotype recorded in network.json")
    return genotype


def load_network(files: Mapping[str, str | Path]) -> nn.Module:
    """Rebuild the network from its files (``{artifact name: path}``), on CPU, eval mode.

    ``network.json`` is read as JSON, the genotype (of a DARTS network) through
    :class:`Genotype`'s checks, a named network's name against
    :data:`~rarn.models.baselines.BASELINES` and its digest, the weights with
    ``torch.load(weights_only=True)`` after their sha256 matched ``network.json``.

    Raises:
        PortableModelError: a file is missing, of another format, or does not match its digest.
    """
    _missing(files, ("weights", "network"))
    meta = json.loads(Path(files["network"]).read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PortableModelError(f"{files['network']}: not a {FORMAT} file")
    genotype = _architecture(files, meta)
    digest = _sha256(Path(files["weights"]))
    if digest != meta["weights_sha256"]:
        raise PortableModelError(f"weights.pt has sha256 {digest}, network.json records another")
    state = torch.load(files["weights"], map_location="cpu", weights_only=True)
    return _build(_factory(meta, genotype), meta["build"], state)


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
