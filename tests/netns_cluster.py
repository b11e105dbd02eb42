"""A real three-node Ray cluster on one machine, for tests (recipe: ../shared/CLUSTER_TESTING.md).

A Linux bridge with a private /24 and no route out; per node a network namespace with its own
address on the bridge, and, inside it, a PID and a mount namespace with a private ``/tmp`` (Ray's
session directory, a submitted job's working directory) and a small ``/dev/shm``. Everything
outside ``/tmp`` is the host's file system, seen by every node at the same path: the virtualenv,
and ``shared/``, the cluster's shared storage (as an NFS mount would be). A path under a node's
``/tmp`` is node-local: no other node sees it.

* ``head`` (0 CPUs: the driver only, like ``deploy/cluster.yaml``) runs the GCS, the dashboard
  and job API on ``HEAD_IP:8265``, and an ``mlflow server`` on ``HEAD_IP:5000``; the worker
  nodes ``w1``, ``w2`` have one CPU each. Every node's environment carries
  ``MLFLOW_TRACKING_URI`` (what ``deploy/cluster.yaml`` gives every node).
* Each node's processes descend from one recorded ``unshare`` process (PID and start time, so a
  reused PID is never killed); SIGKILL on it takes the whole node down: "a node died".
* Jobs are submitted from the host with ``ray job submit --address http://HEAD_IP:8265``.
* Where ``moto_server`` is installed (``moto[server]``, the test extra), an S3 server runs on
  ``HEAD_IP:5555`` with a bucket ``rarn`` (:attr:`NetnsCluster.s3`, else None).

:func:`unavailable_reason` names what is missing (not root, no ``ip``/``unshare``) so the tests
can skip with it; :meth:`NetnsCluster.up` tears down what it built when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
NODE_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # "0" makes workers refuse to join, even on Linux
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_memory_monitor_refresh_ms": "0",  # silences "negative used memory for cgroup -1"
    "RAY_health_check_period_ms": "1000",  # a dead node is noticed in about 2.5 s
    "RAY_health_check_failure_threshold": "5",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # The nodes share the host's hostname, which resolves to 127.0.0.1: without this, gloo
    # (DDP on CPU) advertises loopback and ranks on two nodes cannot connect.
    "GLOO_SOCKET_IFNAME": "eth0",
    "RAY_JOB_STOP_WAIT_TIME_S": "30",  # `ray job stop`: SIGTERM, then SIGKILL after this (3 s)
    "AWS_ACCESS_KEY_ID": "testing",  # the moto S3 server accepts any credentials
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "PYTHONUNBUFFERED": "1",
    "LANG": "C.UTF-8",
}


class ClusterUnavailable(RuntimeError):
    """Namespaces, veths or the bridge cannot be made here (the tests skip with this reason);
    a node that does not come up is a ``TimeoutError`` (a failure, not a skip)."""


def unavailable_reason() -> str | None:
    """Why a cluster cannot be built on this machine, or None. ``RARN_TEST_NO_NETNS=1`` says
    it cannot (to run the single-node fallbacks on a machine that could)."""
    if os.environ.get("RARN_TEST_NO_NETNS") == "1":
        return "RARN_TEST_NO_NETNS=1"
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "not root: network namespaces and bridges need CAP_SYS_ADMIN and CAP_NET_ADMIN"
    missing = [t for t in ("ip", "unshare", "mount") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (iproute2 / util-linux)"
    return None


def single_node_fallback(what: str):
    """A pytest mark: run this single-node test only where the three-node cluster cannot be built
    (``unavailable_reason()``); where it can, ``test_pipeline_multinode.py`` checks ``what`` on
    three nodes, and CI does not pay for both."""
    import pytest

    return pytest.mark.skipif(
        unavailable_reason() is None,
        reason=f"tests/test_pipeline_multinode.py checks {what} on the three-node cluster; this"
        " single-node copy is for machines that cannot build it",
    )


def _sh(*cmd: str) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {p.stderr.strip() or p.returncode}")
    return p.stdout


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _kill(pid: int, start: str | None) -> None:
    """SIGKILL ``pid`` if it is still the process that started at ``start``."""
    if start is not None and _start_time(pid) == start:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Node:
    name: str
    ns: str
    ip: str
    cpus: int
    procs: list[tuple[int, str | None]] = field(default_factory=list)  # unshare PID, start time


@dataclass
class NetnsCluster:
    """Head + workers in network namespaces on a bridge; see the module docstring."""

    base: Path  # outside /tmp: per-node /tmp folders, logs, the MLflow store, the shared folder
    prefix: str
    subnet: str  # "10.213.X"
    nodes: dict[str, Node] = field(default_factory=dict)
    bridge: str = ""
    s3: str | None = None  # the moto S3 endpoint (http://HEAD_IP:5555), when moto is installed

    # -- addresses ------------------------------------------------------------------------------

    @property
    def head(self) -> Node:
        return self.nodes["head"]

    @property
    def shared(self) -> Path:
        return self.base / "shared"

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip}:8265"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.head.ip}:5000"

    def logs(self, name: str) -> str:
        path = self.base / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.is_file() else ""

    # -- life cycle -----------------------------------------------------------------------------

    @classmethod
    def up(cls, workers: int = 2, timeout: float = 180.0) -> NetnsCluster:
        """Build the bridge and namespaces, start MLflow and Ray; tears down on any failure."""
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        tag = f"{os.getpid() % 100_000:05d}"
        base = Path(tempfile.mkdtemp(prefix=f"rarn-nodes-{tag}-", dir="/var/tmp"))
        cluster = cls(base, f"rn{tag}", cls._free_subnet(int(tag)))
        try:
            cluster._network(["head"] + [f"w{i + 1}" for i in range(workers)])
            cluster.start_node("head")
            cluster.wait_alive(1, timeout)
            for i in range(workers):
                cluster.start_node(f"w{i + 1}")
            cluster.wait_alive(len(cluster.nodes), timeout)
            cluster._wait_http(cluster.tracking_uri + "/health", timeout, "mlflow")
            if cluster.s3:
                cluster._wait_http(cluster.s3, timeout, "moto")
                urllib.request.urlopen(urllib.request.Request(f"{cluster.s3}/rarn", method="PUT"))
        except TimeoutError as e:
            logs = "\n".join(f"--- {n}:\n{cluster.logs(n)[-1500:]}" for n in cluster.nodes)
            cluster.down()
            raise TimeoutError(f"{e}\n{logs}") from None
        except BaseException:
            cluster.down()
            raise
        return cluster

    @staticmethod
    def _free_subnet(seed: int) -> str:
        used = _sh("ip", "-o", "-4", "addr")
        for i in range(200):
            subnet = f"10.213.{(seed + i) % 200 + 20}"
            if f" {subnet}." not in used:
                return subnet
        raise ClusterUnavailable("no free 10.213.X.0/24 subnet")

    def _network(self, names: list[str]) -> None:
        """The bridge (host side ``.1``) and one namespace + veth per node (``.2``, ``.3``, ...)."""
        self.bridge = f"{self.prefix}b"
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, name in enumerate(names):
            node = Node(name, f"{self.prefix}-{name}", f"{self.subnet}.{i + 2}", 0 if i == 0 else 1)
            self.nodes[name] = node
            host_end, node_end = f"{self.prefix}{name}", f"{self.prefix}{name}n"
            _sh("ip", "netns", "add", node.ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _sh("ip", "link", "set", host_end, "master", self.bridge, "up")
            _sh("ip", "link", "set", node_end, "netns", node.ns)
            _sh("ip", "-n", node.ns, "link", "set", node_end, "name", "eth0")
            _sh("ip", "-n", node.ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            _sh("ip", "-n", node.ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", node.ns, "link", "set", "lo", "up")  # no default route: no way out
        for sub in ("shared", "logs", "home", "mlflow/tmp", *(f"{n}/tmp" for n in names)):
            (self.base / sub).mkdir(parents=True, exist_ok=True)

    def _spawn(self, node: Node, argv: list[str], log: str, env: dict[str, str]) -> None:
        """Run ``argv`` as PID 1 of new PID and mount namespaces inside the node's netns, with the
        node's private /tmp and /dev/shm; record the ``unshare`` process."""
        node_tmp = self.base / node.name / "tmp"
        setup = (f"mount --rbind {node_tmp} /tmp && "
                 "mount -t tmpfs -o size=300m tmpfs /dev/shm && exec \"$@\"")  # fmt: skip
        path = f"{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        variables = {**NODE_ENV, "PATH": path, "HOME": str(self.base / "home"), **env}
        cmd = ["ip", "netns", "exec", node.ns, "unshare", "--pid", "--fork",
               "--kill-child=SIGKILL", "--mount-proc", "--propagation", "private",
               "env", "-i", *(f"{k}={v}" for k, v in variables.items()),
               "sh", "-c", setup, "sh", *argv]  # fmt: skip
        out = open(self.base / "logs" / f"{log}.log", "a")  # noqa: SIM115 (the child keeps it)
        # cwd outside /tmp: a caller's cwd under the host's /tmp does not exist on the node,
        # and Ray's dashboard modules (forkserver children) die changing into it.
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             cwd=self.base, start_new_session=True)  # fmt: skip
        node.procs.append((p.pid, _start_time(p.pid)))  # the last one is `ray start`

    def _start_mlflow(self) -> None:
        m = self.base / "mlflow"
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "TMPDIR": str(m / "tmp")}
        argv = ["mlflow", "server", "--host", self.head.ip, "--port", "5000", "--workers", "1",
                "--backend-store-uri", f"sqlite:///{m}/mlflow.db",
                "--artifacts-destination", str(m / "artifacts")]  # fmt: skip
        self._spawn(self.head, argv, "mlflow", env)

    def start_node(self, name: str) -> None:
        """``ray start --block`` on the node (the head, or a worker joining it); the head's
        MLflow server too when it is not running."""
        node = self.nodes[name]
        if name == "head" and not node.procs:
            self._start_mlflow()
            moto = os.environ.get("RARN_MOTO_SERVER") or shutil.which("moto_server", path=str(BIN))
            if moto:
                self._spawn(node, [moto, "-H", node.ip, "-p", "5555"], "moto", {})
                self.s3 = f"http://{node.ip}:5555"
        argv = ["ray", "start", "--block", f"--node-ip-address={node.ip}",
                f"--num-cpus={node.cpus}", "--object-store-memory=200000000",
                "--disable-usage-stats"]  # fmt: skip
        if name == "head":
            argv += ["--head", "--port=6379", f"--dashboard-host={node.ip}"]
        else:
            argv += [f"--address={self.head.ip}:6379"]
        self._spawn(node, argv, name, {"MLFLOW_TRACKING_URI": self.tracking_uri})

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's namespaces: every process on it dies at once."""
        node = self.nodes[name]
        for pid, start in node.procs:
            _kill(pid, start)
        node.procs.clear()
        self._sweep(node)

    def _sweep(self, node: Node) -> None:
        with contextlib.suppress(ClusterUnavailable):
            for pid in _sh("ip", "netns", "pids", node.ns).split():
                _kill(int(pid), _start_time(int(pid)))

    def down(self) -> None:
        """SIGKILL every node, delete the namespaces and the bridge, remove the folders."""
        for node in self.nodes.values():
            self.kill_node(node.name)
        for node in self.nodes.values():
            subprocess.run(["ip", "netns", "del", node.ns], capture_output=True, timeout=60)
        if self.bridge:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)

    # -- readiness and state --------------------------------------------------------------------

    def _wait_http(self, url: str, timeout: float, what: str) -> None:
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{what} not up after {timeout:.0f} s:\n{self.logs(what)}")
            time.sleep(0.5)

    def alive(self) -> set[str]:
        """IPs of the nodes the GCS reports alive (the dashboard's state API)."""
        url = f"{self.dashboard}/api/v0/nodes?limit=100&detail=false"
        with urllib.request.urlopen(url, timeout=10) as r:
            rows = json.loads(r.read())["data"]["result"]["result"]
        return {n["node_ip"] for n in rows if n["state"] == "ALIVE"}

    def wait_alive(self, count: int, timeout: float = 180.0) -> None:
        """Until ``count`` nodes are alive. A node whose ``ray start`` exited meanwhile is
        started again (at most twice): on a loaded machine the head's Ray Client server gives
        up after 30 s without its raylet and takes the node down."""
        t0, restarts = time.monotonic(), 0
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if len(self.alive()) >= count:
                    return
            for node in self.nodes.values():
                pid, start = node.procs[-1] if node.procs else (0, None)
                if node.procs and _start_time(pid) != start and restarts < 2 * len(self.nodes):
                    restarts += 1
                    self.kill_node(node.name)
                    self.start_node(node.name)
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{count} nodes not alive after {timeout:.0f} s")
            time.sleep(1.0)

    def pids_on(self, name: str) -> list[int]:
        return [int(p) for p in _sh("ip", "netns", "pids", self.nodes[name].ns).split()]

    # -- jobs -----------------------------------------------------------------------------------

    def project(self) -> Path:
        """A copy of what a user's checkout holds (no venv, runs or data): the job's working dir."""
        dst = self.base / "project"
        if not dst.exists():
            for part in ("rarn", "pipeline", "configs"):
                ignore = shutil.ignore_patterns("__pycache__")
                shutil.copytree(ROOT / part, dst / part, ignore=ignore)
        return dst

    def submit(self, *args: str, job_id: str, wait: bool = True) -> subprocess.Popen:
        """``ray job submit`` from the host: ``python pipeline/run.py ARGS`` on the cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env |= {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard,
               "--submission-id", job_id, "--working-dir", ".", *([] if wait else ["--no-wait"]),
               "--", "python", "pipeline/run.py", *args]  # fmt: skip
        log = open(self.base / "logs" / f"{job_id}.submit.log", "w")  # noqa: SIM115
        return subprocess.Popen(cmd, cwd=self.project(), env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def stop_job(self, job_id: str) -> None:
        """``ray job stop``: Ray sends the driver SIGTERM (SIGKILL after 30 s here)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        subprocess.run([str(BIN / "ray"), "job", "stop", "--address", self.dashboard, job_id],
                       env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                       timeout=120, check=True)  # fmt: skip

    def s3_keys(self, bucket: str, prefix: str) -> list[str]:
        """Object keys under ``prefix`` in the moto S3 server."""
        url = f"{self.s3}/{bucket}?list-type=2&max-keys=1000&prefix={prefix}"
        with urllib.request.urlopen(url, timeout=10) as r:
            return re.findall(r"<Key>([^<]+)</Key>", r.read().decode())

    def job_status(self, job_id: str) -> str:
        with urllib.request.urlopen(f"{self.dashboard}/api/jobs/{job_id}", timeout=10) as r:
            return json.loads(r.read())["status"]

    def job_logs(self, job_id: str) -> str:
        with urllib.request.urlopen(f"{self.dashboard}/api/jobs/{job_id}/logs", timeout=10) as r:
            return json.loads(r.read())["logs"]
