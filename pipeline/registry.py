"""The model registry from the command line: lineage of a registered model, and re-evaluation.

::

    python -m pipeline.registry show rarn-digits@champion
    python -m pipeline.registry evaluate models:/rarn-digits@champion --attacks fgsm pgd --steps 20
    python -m pipeline.registry verify rarn-digits@champion --rows 10

``show`` prints the chain search trial -> genotype -> retraining run -> metrics from the tags
the pipeline recorded (the genotype artifact is re-hashed on the way). ``evaluate`` downloads the
model, checks its sha256 against the one recorded at log time, loads it and runs the attack suite
of :mod:`rarn.robust.evaluation` on the held-out test split of the data the model was trained on
(the
``data`` section of the run's logged ``config.yaml``, or ``--config``). ``verify`` downloads the
per-image records the evaluation logged (``evaluation/records.parquet`` of the retraining run,
sha256-checked), reruns chosen rows (``--rows K`` drawn at random with ``--seed``, or ``--row I``
repeated) on the sha256-checked weights and the same test split, and compares every predicted
label exactly (``rarn.robust.evaluation.verify_records``; exit 1 on any mismatch).

The tracking URI is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db`` (the pipeline's default), so run it where the pipeline ran. The
store is checked first and never created: a missing sqlite database or an unreachable server
exits 3 within seconds (exit 2: bad arguments, 1: no such model or a failed check).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.tracking_uri import TrackingUnavailable, check_reachable, resolve_tracking_uri
from rarn.config import ConfigError, TrackingConfig, load_config

if TYPE_CHECKING:  # MLflow (and torch) are imported once the store answered: a fast failure
    from pipeline.tracking import Tracking

__all__ = ["check_store", "evaluate", "main", "parse_model_ref", "show", "verify"]


def parse_model_ref(ref: str) -> tuple[str, str, str]:
    """``models:/name@alias``, ``name@alias``, ``models:/name/3`` -> (name, kind, value)."""
    body = ref.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, "alias", alias
    if "/" in body:
        name, version = body.rsplit("/", 1)
        return name, "version", version
    raise ValueError(f"model reference {ref!r}: use NAME@ALIAS or models:/NAME/VERSION")


def _version(tracking: Tracking, ref: str) -> Any:
    name, kind, value = parse_model_ref(ref)
    client = tracking.client()
    if kind == "alias":
        return client.get_model_version_by_alias(name, value)
    return client.get_model_version(name, value)


def check_store(uri: str) -> None:
    """Fail fast, creating nothing: an sqlite database must exist, a server must answer.

    Raises:
        TrackingUnavailable: no database file, or the server is unreachable.
    """
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_file():
            raise TrackingUnavailable(
                f"no tracking database at {db}; run this where the pipeline ran, or pass "
                "--tracking-uri / set MLFLOW_TRACKING_URI"
            )
    check_reachable(uri)


def _line(label: str, text: str) -> str:
    return f"{label:<14}{text}"


def show(tracking: Tracking, ref: str) -> str:
    """The lineage of a registered model version as text."""
    from pipeline.tracking import download_checked

    mv = _version(tracking, ref)
    client = tracking.client()
    tags = mv.tags
    out = [_line("model", f"{mv.name} version {mv.version} {list(mv.aliases)} -> {mv.source}")]
    out.append(_line("", f"sha256 {tags.get('rarn.model_sha256', '-')}"))
    search_id = tags.get("rarn.search_run_id")
    if search_id:
        s = client.get_run(search_id)
        m = s.data.metrics
        keys = ("val_acc", "mu_F", "sigma_F", "p_satisfied", "parametric_share")
        out.append(_line("search trial", f"{s.data.tags.get('rarn.key')} "
                         f"{s.data.tags.get('rarn.trial_overrides', '')} run {search_id} "
                         f"({s.info.status})"))  # fmt: skip
        out.append(_line("", "  ".join(f"{k} {m[k]:.4g}" for k in keys if k in m)))
        with tempfile.TemporaryDirectory() as d:
            from rarn.space.genotype import Genotype

            g = Genotype.from_json(
                download_checked(tracking, search_id, "genotype.json", d).read_text()
            )
        check = "verified" if g.sha256() == tags.get("rarn.genotype_sha") else "MISMATCH"
        out.append(_line("genotype", f"sha256 {g.sha256()} ({check})"))
        out.append(_line("", "normal " + " ".join(f"{op}<-{i}" for op, i in g.normal)))
        out.append(_line("", "reduce " + " ".join(f"{op}<-{i}" for op, i in g.reduce)))
    else:
        out.append(_line("genotype", f"sha256 {tags.get('rarn.genotype_sha', '-')} (bundled)"))
    r = client.get_run(tags["rarn.retrain_run_id"])
    m = r.data.metrics
    out.append(_line("retraining", f"run {r.info.run_id} ({r.info.status}), selected by "
                     f"{r.data.tags.get('rarn.selected_by', '-')}"))  # fmt: skip
    lip = [f"{k.removeprefix('final_')} {m[k]:.4g}" for k in
           ("final_log_lipschitz_upper", "final_local_lipschitz", "final_params",
            "final_val_acc", "final_val_robust_acc") if k in m]  # fmt: skip
    out.append(_line("", "  ".join(lip)))
    ev = {k.removeprefix("eval_").removesuffix("_acc"): v for k, v in m.items()
          if k.startswith("eval_")}  # fmt: skip
    flags = [k.removeprefix("rarn.masking.") for k, v in r.data.tags.items()
             if k.startswith("rarn.masking.") and v == "True"]  # fmt: skip
    if ev:
        text = "  ".join(f"{k} {v:.4f}" for k, v in sorted(ev.items()))
        out.append(_line("evaluation", text + f"  masking flags: {', '.join(flags) or 'none'}"))
        data = tags.get("rarn.eval_data_sha256") or r.data.tags.get("rarn.eval_data_sha256", "-")
        out.append(_line("", f"evaluated data sha256 {data}"))
    if tags.get("rarn.promotion"):
        forced = " (--force-promote)" if tags.get("rarn.force_promote") == "true" else ""
        out.append(_line("promotion", tags["rarn.promotion"] + forced))
    parent = tags.get("rarn.parent_run_id")
    if parent:
        p = client.get_run(parent)
        out.append(_line("pipeline run", f"{parent} data sha256 "
                         f"{p.data.tags.get('rarn.data_fingerprint', '-')[:16]}... code "
                         f"{p.data.tags.get('rarn.code_version', '-')}"))  # fmt: skip
    return "\n".join(out)


def evaluate(
    tracking: Tracking,
    ref: str,
    *,
    attacks: Sequence[str] | None = None,
    config: str | None = None,
    overrides: Sequence[str] = (),
    output: str | None = None,
) -> str:
    """Load a registered model (sha256-checked) and re-run the attack suite; returns a table."""
    from pipeline.evaluate import evaluate_model, summary_metrics
    from pipeline.model_store import load_model_checked
    from pipeline.tracking import download_checked
    from rarn.checkpoint import atomic_write
    from rarn.data import as_tensors, load_dataset

    mv = _version(tracking, ref)
    expected = mv.tags.get("rarn.model_sha256")
    if not expected:
        raise ValueError(f"{ref}: no rarn.model_sha256 tag; refusing to load an unchecked model")
    with tempfile.TemporaryDirectory() as d:
        if config is None:  # the configuration the model was trained with
            parent = mv.tags["rarn.parent_run_id"]
            config = str(download_checked(tracking, parent, "config.yaml", Path(d) / "cfg"))
        cfg = load_config(config, overrides)
        model = load_model_checked(tracking, mv.source, expected)
        x, y = as_tensors(load_dataset(cfg.data).test)
        result, parquet, _ = evaluate_model(
            model, (x, y), cfg.evaluation, name=f"{mv.name}/{mv.version}", out_dir=Path(d) / "out",
            attacks=attacks,
        )  # fmt: skip
        if output:
            atomic_write(output, parquet.read_bytes())
    rows = result.to_table().to_pylist()
    lines = [f"{mv.name} version {mv.version}: {len(y)} test points, sha256 verified"]
    for r in rows:
        lines.append(f"  {r['attack']:<12} eps {r['eps']:<8.4g} steps {r['steps']:<4} "
                     f"acc {r['accuracy']:.4f}")  # fmt: skip
    lines.append(json.dumps(summary_metrics(result), sort_keys=True))
    flags = [k for k, v in result.flags.items() if v]
    lines.append(f"masking flags: {', '.join(flags) or 'none'}")
    return "\n".join(lines)


def verify(
    tracking: Tracking,
    ref: str,
    *,
    rows: int = 10,
    row: Sequence[int] = (),
    seed: int = 0,
    config: str | None = None,
    device: str = "cpu",
) -> tuple[bool, str]:
    """Rerun rows of a registered model's evaluation ledger; ``(all matched, report text)``."""
    import pyarrow.parquet as pq

    from pipeline.model_store import load_model_checked
    from pipeline.tracking import download_checked
    from rarn.data import as_tensors, load_dataset
    from rarn.robust.evaluation import choose_rows, verify_records

    mv = _version(tracking, ref)
    expected = mv.tags.get("rarn.model_sha256")
    if not expected:
        raise ValueError(f"{ref}: no rarn.model_sha256 tag; refusing to load an unchecked model")
    with tempfile.TemporaryDirectory() as d:
        if config is None:
            parent = mv.tags["rarn.parent_run_id"]
            config = str(download_checked(tracking, parent, "config.yaml", Path(d) / "cfg"))
        cfg = load_config(config)
        run_id = mv.tags["rarn.retrain_run_id"]
        table = pq.read_table(
            download_checked(tracking, run_id, "evaluation/records.parquet", Path(d) / "rec")
        )
        model = load_model_checked(tracking, mv.source, expected)
        x, y = as_tensors(load_dataset(cfg.data).test)
    chosen = list(row) or choose_rows(table, rows, seed=seed)
    checks = verify_records(model, x, y, table, chosen, device=device)
    ok = all(c.ok for c in checks)
    lines = [f"{mv.name} version {mv.version}: {len(checks)} ledger rows rerun"]
    lines += [f"  {c}" for c in checks]
    lines.append("verified: every row reproduced" if ok else "MISMATCH: see the rows above")
    return ok, "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.registry", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI or ./mlflow.db"
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="lineage of a registered model version")
    s.add_argument("model", help="NAME@ALIAS, models:/NAME@ALIAS or models:/NAME/VERSION")
    e = sub.add_parser("evaluate", help="load a registered model and re-run the attack suite")
    e.add_argument("model")
    e.add_argument("--attacks", nargs="+", default=None, help="default: the config's suite")
    e.add_argument("--config", default=None, help="default: the config logged with the model")
    e.add_argument("--output", default=None, help="write the results table (Parquet) here")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable, e.g. --set evaluation.steps=50")  # fmt: skip
    v = sub.add_parser("verify", help="rerun rows of a model's evaluation ledger and compare")
    v.add_argument("model")
    v.add_argument("--rows", type=int, default=10, help="how many rows to draw (default 10)")
    v.add_argument("--row", type=int, action="append", default=[], help="a row index, repeatable")
    v.add_argument("--seed", type=int, default=0, help="seed of the row draw")
    v.add_argument("--config", default=None, help="default: the config logged with the model")
    v.add_argument("--device", default="cpu", help="the device kind the evaluation ran on")
    args = p.parse_args(argv)
    from pipeline.env import apply_env_defaults

    apply_env_defaults(connect=True)  # MLflow's HTTP retries bounded, no redirects followed
    try:
        uri = resolve_tracking_uri(TrackingConfig(tracking_uri=args.tracking_uri))
        check_store(uri)
        from pipeline.tracking import Tracking

        tracking = Tracking(uri, experiment_id="", parent_run_id="")
        if args.command == "show":
            print(show(tracking, args.model))
        elif args.command == "verify":
            ok, text = verify(tracking, args.model, rows=args.rows, row=args.row,
                              seed=args.seed, config=args.config, device=args.device)  # fmt: skip
            print(text)
            return 0 if ok else 1
        else:
            text = evaluate(tracking, args.model, attacks=args.attacks, config=args.config,
                            overrides=args.overrides, output=args.output)  # fmt: skip
            print(text)
    except TrackingUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # MlflowException (no such model/alias), integrity errors
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
