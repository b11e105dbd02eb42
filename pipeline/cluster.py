"""What the Ray cluster must offer before the first trial: room for every stage, and, on more
than one node, tracking and storage that every node reaches.

Checked by the driver once Ray is up and before anything is written (a :class:`ConfigError`
is the CLI's exit 2):

* **Resources.** A search trial (``tune.cpus_per_trial`` / ``gpus_per_trial``) must fit on one
  node, and a retraining's ``tune.retrain_workers`` Ray Train workers must fit at once (Ray
  places them as one group). Otherwise Ray would wait silently forever: an error on a Ray
  instance the driver started (it cannot grow), a warning naming what will wait on a cluster it
  joined (an autoscaler may add nodes).
* **Multi-node.** When the joined cluster has more than one node alive (or ``tune.cluster`` is
  ``multi-node``), a trial may run on any node: an sqlite/file tracking URI would be a different
  database on each node, and a ``run_dir`` or local ``tune.storage_path`` on one node's disk
  would split checkpoints and ``state.json`` across nodes, so ``--resume`` could not find them.
  Both are errors. Whether a local path is shared (NFS, a bind mount) is not guessed from its
  name: the driver writes a probe file beside it and a zero-CPU task on every alive node reads
  it back; the probe is removed at once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.env import env_seconds
from pipeline.storage import is_uri
from pipeline.tracking_uri import redact_uri
from rarn.config import Config, ConfigError

__all__ = [
    "Demand",
    "Node",
    "alive_nodes",
    "check_cluster",
    "check_ray_address",
    "check_resources",
    "demands",
    "idle_cpu_share",
    "task_cpus",
    "use_assigned_cpus",
]

_PROBE_TIMEOUT_S = 120.0  # a node's first task may wait for its worker and the job's code


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    resources: dict[str, float]


@dataclass(frozen=True)
class Demand:
    """``count`` units of ``bundle`` that must run at once, each unit on one node."""

    what: str
    bundle: dict[str, float]
    count: int = 1

    def fits(self, nodes: Sequence[Node]) -> int:
        """How many units the nodes hold at once."""
        wanted = {k: v for k, v in self.bundle.items() if v > 0}
        if not wanted:
            return self.count
        per_node = [min(int(n.resources.get(k, 0.0) / v + 1e-9) for k, v in wanted.items())
                    for n in nodes]  # fmt: skip
        return sum(per_node)

    def text(self) -> str:
        unit = " + ".join(f"{v:g} {k}" for k, v in self.bundle.items() if v > 0) or "nothing"
        return f"{self.what} needs {self.count} x ({unit}) at once"


def alive_nodes() -> list[Node]:
    """The cluster's alive nodes and their total resources (``ray.nodes()``)."""
    import ray

    return [
        Node(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"]))
        for n in ray.nodes()
        if n["Alive"]
    ]


def demands(cfg: Config, stages: Sequence[str]) -> list[Demand]:
    """What each requested stage asks of the cluster (evaluation tasks use a trial's share)."""
    t = cfg.tune
    trial = {"CPU": t.cpus_per_trial, "GPU": t.gpus_per_trial}
    out = []
    if "search" in stages:
        out.append(Demand("a search trial (tune.cpus_per_trial, tune.gpus_per_trial)", trial))
    if "retrain" in stages:
        worker = {"CPU": t.retrain_cpus_per_worker, "GPU": 1.0 if t.retrain_use_gpu else 0.0}
        what = "a retraining (tune.retrain_workers x tune.retrain_cpus_per_worker)"
        out.append(Demand(what, worker, t.retrain_workers))
    if "evaluate" in stages:
        out.append(Demand("an evaluation task (tune.cpus_per_trial, tune.gpus_per_trial)", trial))
    return out


def task_cpus(per_task: float, n_tasks: int, nodes: Sequence[Node]) -> float:
    """CPUs for each of ``n_tasks`` concurrent CPU tasks (evaluation, transfer, retraining
    workers): at least ``per_task`` (the configured share), more where the cluster would
    otherwise idle: an equal share of its CPUs in whole CPUs, such that all ``n_tasks`` fit on
    the nodes at once (a task runs on one node).

    One model on a 2-CPU machine gets both cores instead of leaving one idle (the default
    pipeline's evaluation: 413 s with one thread, issue 20).
    """
    cpus = [n.resources.get("CPU", 0.0) for n in nodes]
    if n_tasks < 1 or not cpus:
        return per_task
    share = int(min(max(cpus), sum(cpus) / n_tasks))
    while share > per_task and Demand("", {"CPU": share}, n_tasks).fits(nodes) < n_tasks:
        share -= 1  # uneven nodes: every task must still find room at once
    return max(per_task, float(share))


def idle_cpu_share(per_task: float, n_tasks: int, *, gpu: bool) -> float:
    """:func:`task_cpus` on the alive nodes for CPU tasks; GPU tasks keep ``per_task``."""
    return per_task if gpu else task_cpus(per_task, n_tasks, alive_nodes())


def use_assigned_cpus() -> int:
    """In a Ray task: as many torch threads as the task was given CPUs (at least 1); returns
    the count. Ray sets ``OMP_NUM_THREADS`` per task, but a reused worker process imported
    torch under an earlier task's value, so the threads are set here, explicitly."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    return n


def _capacity(nodes: Sequence[Node]) -> str:
    total = {k: sum(n.resources.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    return f"{len(nodes)} node(s), {total['CPU']:g} CPU, {total['GPU']:g} GPU"


def check_resources(
    cfg: Config, stages: Sequence[str], nodes: Sequence[Node], *, can_grow: bool
) -> list[str]:
    """Every stage's demand against the alive nodes.

    Returns:
        Warnings, one per stage that will wait for nodes to join (``can_grow``).

    Raises:
        ConfigError: a stage can never start on this cluster (``can_grow`` False).
    """
    short = [d for d in demands(cfg, stages) if d.fits(nodes) < d.count]
    if not short:
        return []
    have = _capacity(nodes)
    if not can_grow:
        what = "; ".join(f"{d.text()}, but the cluster ({have}) holds {d.fits(nodes)}"
                         for d in short)  # fmt: skip
        raise ConfigError(f"not enough resources, Ray would wait forever: {what}")
    return [f"{d.text()}; the cluster ({have}) holds {d.fits(nodes)} now: it will wait until "
            "nodes join" for d in short]  # fmt: skip


def _read_probes(paths: list[str]) -> list[str | None]:
    out = []
    for path in paths:
        try:
            out.append(Path(path).read_text())
        except OSError:
            out.append(None)
    return out


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _unseen(paths: Mapping[str, Path], nodes: Sequence[Node]) -> dict[str, list[str]]:
    """For each named path, the IPs of the nodes that do not see a probe file written beside it
    (one zero-CPU task per node reads them all; the probes are removed afterwards)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On

    probes: dict[str, tuple[str, str]] = {}  # key -> (probe file, its token)
    try:
        for key, path in paths.items():
            try:
                fd, probe = tempfile.mkstemp(prefix=".rarn-probe-", dir=_existing(path))
            except OSError as e:
                raise ConfigError(f"{key} {path}: cannot write there ({e})") from None
            probes[key] = (probe, secrets.token_hex(16))
            with os.fdopen(fd, "w") as f:
                f.write(probes[key][1])
        files = [probe for probe, _ in probes.values()]
        read = ray.remote(num_cpus=0)(_read_probes)
        refs = [read.options(scheduling_strategy=On(n.node_id, soft=False)).remote(files)
                for n in nodes]  # fmt: skip
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_PROBE_TIMEOUT_S)
        seen = [ray.get(r) if r in ready else [None] * len(files) for r in refs]
    finally:
        for probe, _ in probes.values():
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return {key: [n.ip for n, s in zip(nodes, seen) if s[i] != token]
            for i, (key, (_, token)) in enumerate(probes.items())}  # fmt: skip


def _check_multi_node(cfg: Config, nodes: Sequence[Node], *, uri: str, run_dir: Path,
                      storage_path: str) -> None:  # fmt: skip
    errors = []
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        errors.append(
            f"tracking URI {redact_uri(uri)} is a file on one node's disk (each node would open "
            "its own store): run an MLflow server and set MLFLOW_TRACKING_URI=http://HOST:PORT "
            "(or tracking.tracking_uri) for the job"
        )
    paths = {"run_dir": run_dir}
    if not is_uri(storage_path):
        paths["tune.storage_path"] = Path(storage_path).resolve()
    for key, missing in _unseen(paths, nodes).items():
        if missing:
            errors.append(
                f"{key} {paths[key]} is on node-local storage (not seen from "
                f"{', '.join(missing)}): put it on storage every node mounts at the same path"
                + (", or use s3://..." if key != "run_dir" else "")
            )
    if errors:
        raise ConfigError(f"on a multi-node cluster ({_capacity(nodes)}): " + "; ".join(errors))


def check_cluster(cfg: Config, stages: Sequence[str], *, joined: bool, uri: str, run_dir: Path,
                  storage_path: str) -> list[str]:  # fmt: skip
    """Resources, then (on more than one node) tracking and storage; returns warnings.

    Args:
        joined: the driver joined an existing cluster (``$RAY_ADDRESS``) rather than starting
            its own instance.
    """
    nodes = alive_nodes()
    warnings = check_resources(cfg, stages, nodes, can_grow=joined)
    if cfg.tune.cluster == "multi-node" or (joined and len(nodes) > 1):
        _check_multi_node(cfg, nodes, uri=uri, run_dir=run_dir, storage_path=storage_path)
        if len(nodes) < 2:
            warnings.append("tune.cluster=multi-node, but only one node is alive: run_dir and "
                            "tune.storage_path were checked on it alone")  # fmt: skip
    return warnings


def _seconds(name: str, default: str) -> float:
    try:
        return env_seconds(name, default)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_ray_address(address: str, timeout: float | None = None) -> None:
    """Refuse a ``$RAY_ADDRESS`` that does not answer, in ``timeout`` seconds (default
    ``$RARN_RAY_CONNECT_TIMEOUT_S``, 10), before ``ray.init`` (which would wait for it for minutes
    with no message of ours). ``auto`` and ``local`` are left to Ray.

    Raises:
        ConfigError: not ``HOST:PORT`` (or ``ray://HOST:PORT``), or nothing listens there.
    """
    text = address.strip()
    if text in ("auto", "local"):
        return
    timeout = _seconds("RARN_RAY_CONNECT_TIMEOUT_S", "10") if timeout is None else timeout
    hostport = text.split("://", 1)[1] if "://" in text else text
    host, _, port = hostport.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"RAY_ADDRESS={address!r}: expected HOST:PORT of a Ray head node "
                          "(e.g. 127.0.0.1:6379), 'auto', or unset for a local Ray")  # fmt: skip
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ConfigError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({reason}, {timeout:g} s); "
            "start it (ray start --head) or unset RAY_ADDRESS for a local Ray"
        ) from None
