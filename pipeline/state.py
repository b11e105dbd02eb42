"""What each stage finished, as typed records, kept in ``<run_dir>/state.json``.

``--resume`` reads it to skip finished work: a search that finished, retrainings and evaluations
that ended without an error, the transfer matrix of the evaluated models. Every stage result is
a dataclass (:class:`TrialOutcome`, :class:`RetrainOutcome`, :class:`EvalOutcome`,
:class:`TransferOutcome`); a stage that has not finished is ``None`` (the search, the
registration, the transfer matrix) or absent from its mapping (retrainings, evaluations), never
a placeholder. :meth:`RunState.save` writes the file atomically, so an interrupted driver leaves
the previous state or the new one.

The JSON layout is that of earlier versions (``{}`` for a stage not finished; a key they did not
write, e.g. ``transfer``, reads as not finished), so run directories written by them resume
too. This module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rarn.checkpoint import atomic_write
from rarn.space.genotype import Genotype

__all__ = [
    "BASELINE_PREFIX",
    "HEADLINE",
    "EvalOutcome",
    "Evidence",
    "Registration",
    "RetrainOutcome",
    "RunState",
    "SearchState",
    "StateError",
    "TransferOutcome",
    "TrialOutcome",
    "is_baseline",
]

STATE_FILE = "state.json"
HEADLINE = "eval_worst_case_acc"
"""The headline metric: per image, robust under every attack that ran on it (pipeline.evaluate);
what ranks models, what the promotion compares and what the report leads with."""
BASELINE_PREFIX = "ref-"
"""Keys of reference networks (``retrain.baselines``): ranked beside the searched ones, never
the run's champion."""


class StateError(ValueError):
    """``state.json`` cannot be read as a run state (the message names the file)."""


def is_baseline(key: str) -> bool:
    """A reference network's key (``ref-<name>``), not a searched or configured genotype."""
    return key.startswith(BASELINE_PREFIX)


def _check_key(key: object) -> None:
    if not isinstance(key, str) or key in ("", ".", "..") or any(c in key for c in "/\\\0"):
        raise ValueError(f"key {key!r} is not a plain name (it would name a folder elsewhere)")


@dataclass
class TrialOutcome:
    """One search trial after the experiment: status, last metrics, lineage."""

    key: str
    overrides: dict[str, Any]
    status: str  # TERMINATED | ERROR | (interrupted:) UNFINISHED
    metrics: dict[str, float] = field(default_factory=dict)
    complete: bool = False  # ran all its epochs (not stopped early by ASHA)
    error: str | None = None
    search_run_id: str | None = None
    genotype_sha: str | None = None
    genotype: Genotype | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "genotype"}
        d["genotype"] = self.genotype.to_dict() if self.genotype else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialOutcome:
        g = d.get("genotype")
        return cls(**{**d, "genotype": Genotype.from_dict(g) if g else None})


@dataclass
class RetrainOutcome:
    """One retraining after the stage: lineage ids, model, final metrics, or its error."""

    key: str
    genotype_sha: str
    search_run_id: str
    retrain_run_id: str | None = None
    model_uri: str | None = None
    model_sha256: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EvalOutcome:
    """Headline numbers of one evaluated model (the full table is in MLflow and on disk)."""

    key: str
    metrics: dict[str, float] = field(default_factory=dict)
    flags: dict[str, bool | None] = field(default_factory=dict)
    results_path: str = ""
    error: str | None = None
    data_sha256: str = ""  # of the evaluated test tensors (pipeline.evaluate.data_sha256)
    protocol: str = ""  # sha256 of the evaluation settings (pipeline.evaluate.protocol_sha256)
    robust_mask: str = ""  # the per-image headline, packed (tag rarn.eval_robust)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def raised_flags(self) -> list[str]:
        """The gradient-masking flags that were raised (checks not run are not flags)."""
        return sorted(k for k, v in self.flags.items() if v)


@dataclass(frozen=True)
class Evidence:
    """What a model is ranked by: ``metric`` = ``value`` on ``n`` images (``data_sha256``), with
    its 95 % interval; an unevaluated model falls back to its retraining's final validation.

    :meth:`rank` is the one "best model" rule: the champion is the highest-ranked model, and the
    report lists models in this order.
    """

    key: str
    evaluated: bool
    unflagged: bool  # no gradient-masking flag raised
    metric: str
    value: float
    clean: float
    n: int = 0
    interval: tuple[float, float] | None = None
    data_sha256: str = ""

    @classmethod
    def of(cls, o: RetrainOutcome, ev: EvalOutcome | None) -> Evidence:
        if ev is not None and not ev.error and ev.metrics:
            m = ev.metrics
            lo, hi = m.get("eval_worst_case_lo"), m.get("eval_worst_case_hi")
            return cls(
                o.key, True, not ev.raised_flags(), HEADLINE, m[HEADLINE], m["eval_clean_acc"],
                int(m.get("eval_worst_case_n", 0)), None if lo is None or hi is None else (lo, hi),
                ev.data_sha256,
            )  # fmt: skip
        m = o.metrics
        robust, clean = m.get("final_val_robust_acc", 0.0), m.get("final_val_acc", 0.0)
        return cls(o.key, False, True, "final_val_robust_acc", robust, clean)

    def rank(self) -> tuple[bool, bool, float, float]:
        """Evaluated first, unflagged next, then the headline (else the validation's robust
        accuracy), then clean accuracy: larger is better."""
        return (self.evaluated, self.unflagged, self.value, self.clean)


@dataclass
class TransferOutcome:
    """The transfer matrix of the evaluated models (:mod:`pipeline.transfer`), or its error."""

    models: list[str]  # source = target keys, in the order of the retrainings
    path: str = ""  # <run_dir>/evaluation/transfer.parquet
    png: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SearchState:
    """A finished search: every trial's outcome and the keys selected for retraining."""

    selected: list[str]
    outcomes: list[TrialOutcome]

    def outcome(self, key: str) -> TrialOutcome | None:
        return next((o for o in self.outcomes if o.key == key), None)


@dataclass
class Registration:
    """This run's registered version; ``promoted``: the alias points at it (``reason``: why, or
    why not, see :mod:`pipeline.promotion`)."""

    name: str
    alias: str
    version: str
    uri: str  # models:/<name>@<alias> when promoted, else models:/<name>/<version>
    key: str  # the trial (or bundled genotype) it was retrained from
    promoted: bool = True  # state files of earlier versions promoted unconditionally
    reason: str = ""


@dataclass
class RunState:
    """Lineage ids and every stage's outcomes for one run directory."""

    tracking_uri: str = ""
    experiment_id: str = ""
    parent_run_id: str = ""
    search: SearchState | None = None  # None: no search has finished here
    retrain: dict[str, RetrainOutcome] = field(default_factory=dict)  # key -> outcome
    evaluate: dict[str, EvalOutcome] = field(default_factory=dict)  # key -> outcome
    registered: Registration | None = None
    transfer: TransferOutcome | None = None  # None: no transfer matrix made here
    # Ray Tune's experiment files (relative path -> accepted sha256, newest first), recorded as
    # the run wrote them; --resume refuses files that are not among them (pipeline.tune_state).
    tune_files: dict[str, list[str]] = field(default_factory=dict)

    # -- what is finished -----------------------------------------------------------------------

    def retrained(self) -> list[RetrainOutcome]:
        """Retrainings that ended without an error, in the order they were recorded."""
        return [o for o in self.retrain.values() if not o.error]

    def retrain_done(self, key: str) -> bool:
        o = self.retrain.get(key)
        return o is not None and not o.error

    def evaluate_done(self, key: str) -> bool:
        o = self.evaluate.get(key)
        return o is not None and not o.error

    def transfer_done(self, keys: list[str]) -> bool:
        """A transfer matrix of exactly these models was made (a model evaluated later redoes
        it)."""
        t = self.transfer
        return t is not None and not t.error and t.models == list(keys)

    def eval_metrics(self, key: str) -> dict[str, float]:
        """The evaluation's headline metrics of ``key`` (empty when not evaluated)."""
        o = self.evaluate.get(key)
        return o.metrics if o is not None else {}

    def evidence(self, o: RetrainOutcome) -> Evidence:
        return Evidence.of(o, self.evaluate.get(o.key))

    def ranked(self) -> list[RetrainOutcome]:
        """Every retraining, best first by :meth:`Evidence.rank` (ties: in recorded order)."""
        return sorted(self.retrain.values(), key=lambda o: self.evidence(o).rank(), reverse=True)

    def champion(self) -> RetrainOutcome | None:
        """The best-ranked (:meth:`Evidence.rank`) retrained searched model with a logged model."""
        ok = [o for o in self.retrained() if o.model_uri and not is_baseline(o.key)]
        return max(ok, key=lambda o: self.evidence(o).rank()) if ok else None

    # -- state.json -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        search = self.search
        return {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "search": {} if search is None else {
                "done": True,
                "selected": list(search.selected),
                "outcomes": [o.to_dict() for o in search.outcomes],
            },
            "retrain": {k: o.to_dict() for k, o in self.retrain.items()},
            "evaluate": {k: o.to_dict() for k, o in self.evaluate.items()},
            "registered": {} if self.registered is None else dataclasses.asdict(self.registered),
            "transfer": {} if self.transfer is None else self.transfer.to_dict(),
            "tune_files": {k: list(v) for k, v in self.tune_files.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunState:
        s, reg, tr = d.get("search") or {}, d.get("registered") or {}, d.get("transfer") or {}
        search = None
        if s.get("done"):
            outcomes = [TrialOutcome.from_dict(o) for o in s["outcomes"]]
            search = SearchState(list(s["selected"]), outcomes)
        keys = [*(d.get("retrain") or {}), *(d.get("evaluate") or {})]
        if search is not None:
            keys += [*search.selected, *(o.key for o in search.outcomes)]
        for key in keys:  # keys become folder names (retrain/<key>, evaluation/<key>)
            _check_key(key)
        return cls(
            tracking_uri=d.get("tracking_uri", ""),
            experiment_id=d.get("experiment_id", ""),
            parent_run_id=d.get("parent_run_id", ""),
            search=search,
            retrain={k: RetrainOutcome(**o) for k, o in (d.get("retrain") or {}).items()},
            evaluate={k: EvalOutcome(**o) for k, o in (d.get("evaluate") or {}).items()},
            registered=Registration(**reg) if reg else None,
            transfer=TransferOutcome(**tr) if tr else None,
            tune_files={k: list(v) for k, v in (d.get("tune_files") or {}).items()},
        )

    def save(self, run_dir: Path) -> None:
        """Write ``<run_dir>/state.json`` atomically."""
        text = json.dumps(self.to_dict(), indent=1, sort_keys=True)
        atomic_write(Path(run_dir) / STATE_FILE, text)

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        """Read ``<run_dir>/state.json``.

        Raises:
            StateError: the file is unreadable, not JSON, or not a run state (names the file).
        """
        path = Path(run_dir) / STATE_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise StateError(
                f"{path}: not a readable run state ({type(e).__name__}: {e}); restore it from a "
                "backup, or start a new run in another run_dir"
            ) from None
