"""The run directory is untrusted input (issue 21): one test per class of attack or fault.

0. names in checkpoint files that leave their folder, links out of the run directory;
1. a forged ``state.json`` cannot move the alias (evidence comes from the MLflow runs);
2. a planted pickle whose sha256 is in ``state.json`` is refused (digests live in MLflow);
3. the tracking URI and the token never come from ``state.json`` (a header-recording server);
4. values the registry or Ray would refuse, and unusable run directories: exit 2, nothing
   written;
5. bounded waits with our own one-line message (cluster address, a failing tracking server);
6. file-system faults: exit 1 naming the path, the state stays resumable.

Nothing here starts Ray: the CLI refuses before it, and the CLI runs that get past the
pre-flight have their Ray and stage calls replaced (the stages are tested elsewhere). One sqlite
tracking store is shared by the module.
"""

from __future__ import annotations

import errno
import http.server
import json
import os
import pickle
import threading
import time
from pathlib import Path

import pytest

from pipeline.checkpoints import (
    PROGRESS,
    CheckpointCorrupted,
    TrialStore,
    UnsafeCheckpointPath,
    check_tree,
    commit_digest,
)
from pipeline.run import EXIT, main
from pipeline.state import EvalOutcome, Registration, RetrainOutcome, RunState, StateError
from pipeline.tracking_uri import TrackingUnavailable, check_reachable
from pipeline.tune_state import digest_tags, digests_from_tags, storage_digests, store_digests
from rarn.config import ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE, "--quiet", f"run_dir={run_dir}", *extra]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An sqlite tracking store with a pipeline parent run (``Tracking``)."""
    from pipeline.tracking import prepare_tracking

    d = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{d}/mlflow.db"
    cfg = load_config(SMOKE, [f"run_dir={d}/run"])
    return prepare_tracking(cfg, uri=uri, run_dir=d / "run", fingerprint="fp")


@pytest.fixture
def env(tmp_path, monkeypatch, store):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME"):
        monkeypatch.delenv(k, raising=False)
    return store


def _resumable(run_dir: Path, state: RunState) -> Path:
    cfg = load_config(SMOKE, [f"run_dir={run_dir}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    state.save(run_dir)
    return run_dir


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------------
# 0. Paths read from the run directory stay inside their folder; no link is followed out


def _commit(store: TrialStore, epoch: int) -> Path:
    store.work.mkdir(parents=True, exist_ok=True)
    (store.work / "checkpoint.pt").write_bytes(b"weights %d" % epoch)
    return store.commit(epoch)


def _forge(ckpt: Path, files: dict[str, str], epoch: int = 2) -> None:
    """The commit's progress.json naming ``files``, as a newer epoch than the local commit."""
    progress = json.loads((ckpt / PROGRESS).read_text())
    (ckpt / PROGRESS).write_text(json.dumps(progress | {"files": files, "epoch": epoch}))


def test_names_in_a_checkpoint_never_leave_its_folder(tmp_path):
    run_dir = tmp_path / "run"
    target = tmp_path / "site-packages"  # what the attack wrote a .pth file into
    target.mkdir()
    trial = TrialStore(run_dir / "search" / "trials" / "t00", run_dir)
    ckpt = _commit(trial, 1)
    payload = ckpt / "evil.pth"
    payload.write_text("import os; os.system('touch ran')\n")
    from rarn.checkpoint import file_sha256

    sha = file_sha256(payload)
    ray_ckpt = run_dir / "ray" / "search" / "t00" / "checkpoint_000001"  # Ray's copy
    ray_ckpt.mkdir(parents=True)
    for p in ckpt.iterdir():
        (ray_ckpt / p.name).write_bytes(p.read_bytes())

    class Reported:
        @staticmethod
        def as_directory():
            import contextlib

            return contextlib.nullcontext(str(ray_ckpt))

    for name in ("../../../../../site-packages/evil.pth", "/abs/evil.pth", "..", "a/../b"):
        _forge(ray_ckpt, {name: sha})
        with pytest.raises(UnsafeCheckpointPath, match=rf"{ray_ckpt / PROGRESS}: file name"):
            trial.restore(Reported(), "t00")
        with pytest.raises(UnsafeCheckpointPath, match=str(ray_ckpt / PROGRESS)):
            check_tree(run_dir)  # the pre-flight's scan refuses it before anything runs
    assert list(target.iterdir()) == []  # nothing was copied out
    # A symlinked file inside the commit, a LATEST naming a folder elsewhere, a linked trial.
    _forge(ray_ckpt, json.loads((ckpt / PROGRESS).read_text())["files"], epoch=1)
    (ckpt / "checkpoint.pt").unlink()
    (ckpt / "checkpoint.pt").symlink_to(payload)
    with pytest.raises(UnsafeCheckpointPath, match="symbolic link"):
        trial.restore(None, "t00")
    (ckpt / "checkpoint.pt").unlink()
    (trial.root / "LATEST").write_text("../../../../../site-packages")
    with pytest.raises(UnsafeCheckpointPath, match="does not name a commit"):
        trial.restore(None, "t00")
    with pytest.raises(UnsafeCheckpointPath, match="LATEST"):
        check_tree(run_dir)
    linked = run_dir / "search" / "trials" / "t01"
    linked.symlink_to(target, target_is_directory=True)
    with pytest.raises(UnsafeCheckpointPath, match="outside the run directory"):
        TrialStore(linked, run_dir).restore(None, "t01")
    (trial.root / "LATEST").write_text(ckpt.name)
    with pytest.raises(UnsafeCheckpointPath, match=rf"{linked} is a symbolic link"):
        check_tree(run_dir)
    assert list(target.iterdir()) == []


def test_resume_refuses_a_path_in_a_checkpoint_exit_2_nothing_written(env, tmp_path, capsys):
    run_dir = _resumable(tmp_path / "run", RunState(parent_run_id=env.parent_run_id))
    ckpt = run_dir / "ray" / "search" / "t00" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / PROGRESS).write_text(json.dumps({"epoch": 1, "files": {"../../../../x.pth": "0"}}))
    before = _tree(tmp_path)
    assert main(_args(run_dir, "--resume")) == EXIT["usage"]
    err = capsys.readouterr().err
    assert f"{ckpt / PROGRESS}: file name '../../../../x.pth'" in err and "refused" in err
    assert "Traceback" not in err and _tree(tmp_path) == before


def test_keys_in_state_json_never_name_a_folder_elsewhere(tmp_path):
    for where in ("retrain", "evaluate"):
        (tmp_path / "state.json").write_text(json.dumps({where: {"../../x": {"key": "../../x"}}}))
        with pytest.raises(StateError, match=r"key '\.\./\.\./x' is not a plain name"):
            RunState.load(tmp_path)


# ----------------------------------------------------------------------------------------------
# 1. An edited state.json cannot move the alias


def _retrain_run(tracking, key: str, worst: float, flags: dict[str, bool]) -> str:
    run = tracking.child_run("retrain", key)
    run.set_tags({"rarn.model_uri": f"runs:/{run.run_id}/model", "rarn.model_sha256": key * 32,
                  "rarn.eval_data_sha256": "d" * 64, "rarn.eval_protocol": "p" * 64}
                 | {f"rarn.masking.{k}": v for k, v in flags.items()})  # fmt: skip
    run.log_metrics({"eval_worst_case_acc": worst, "eval_clean_acc": 0.9}, step=0)
    run.log_metrics({"final_val_acc": 0.9}, step=1)
    run.end("FINISHED")
    return run.run_id


def test_a_forged_state_json_cannot_move_the_alias(store, tmp_path):
    from pipeline.evidence import store_retrained
    from pipeline.model_store import register_version
    from pipeline.stages import Pipeline

    name = f"forged-{tmp_path.name}"[:60]
    cfg = load_config(SMOKE, [f"run_dir={tmp_path}/run", f"tracking.registered_model={name}"])
    flagged = _retrain_run(
        store, "t0", 0.30, {"zero_gradients": True, "probability_outputs": False}
    )
    clean = _retrain_run(store, "t1", 0.50, {"zero_gradients": False})
    other = register_version(store, name, "runs:/x/model", {"rarn.retrain_run_id": "x"})
    # The attacker's state.json: t0 unflagged at 0.99, t1 worse; the registration names version
    # `other` (a model of another run) as t1's.
    state = RunState(parent_run_id=store.parent_run_id)
    for key, rid in (("t0", flagged), ("t1", clean)):
        state.retrain[key] = RetrainOutcome(key, "g", "s", rid, f"runs:/{rid}/model", key * 32)
    forged = {"eval_worst_case_acc": 0.99, "eval_clean_acc": 0.99}
    state.evaluate["t0"] = EvalOutcome("t0", forged, {"zero_gradients": False}, "", None,
                                       "d" * 64, "p" * 64)  # fmt: skip
    state.evaluate["t1"] = EvalOutcome("t1", {"eval_worst_case_acc": 0.1, "eval_clean_acc": 0.1},
                                       {}, "", None, "d" * 64, "p" * 64)  # fmt: skip
    state.registered = Registration(name, "champion", other, f"models:/{name}/{other}", "t1",
                                    promoted=False)  # fmt: skip
    # The evaluation loads, and logs to, the store's model and run, not the ones state.json names.
    state.retrain["t1"].model_uri = f"runs:/{flagged}/model"
    done, notes = store_retrained(state, store)
    assert [(r.key, r.model_uri) for r in done] == [("t0", f"runs:/{flagged}/model"),
                                                   ("t1", f"runs:/{clean}/model")]  # fmt: skip
    assert notes == ["state.json's model of t1 differs from the tracking store's: the store's "
                     "is used"]  # fmt: skip
    said: list[str] = []
    Pipeline(cfg, tmp_path, state, store, True, said.append, 0).register()
    client = store.client()
    alias = client.get_registered_model(name).aliases.get("champion")
    assert alias is not None and str(alias) != other  # not the version state.json named
    mv = client.get_model_version(name, str(alias))
    assert mv.tags["rarn.retrain_run_id"] == clean  # the unflagged model, by the store's numbers
    assert mv.tags["rarn.eval_worst_case_acc"] == "0.5" and mv.tags["rarn.masking_flags"] == "none"
    text = "\n".join(said)
    assert "state.json's evaluation of t0 differs from the tracking store's" in text
    assert "masking flags none vs ['zero_gradients']" in text
    assert f"state.json names version '{other}'" in text


def test_an_edited_genotype_in_state_json_is_not_retrained(store, tmp_path):
    from pipeline.stages import Pipeline, PipelineError
    from pipeline.state import SearchState, TrialOutcome
    from rarn.space.genotype import GENOTYPES

    good, other = GENOTYPES["RACL"], next(g for k, g in GENOTYPES.items() if k != "RACL")
    run = store.child_run("search", "g0", tags={"rarn.genotype_sha": good.sha256()})
    cfg = load_config(SMOKE, [f"run_dir={tmp_path}/run"])
    state = RunState(parent_run_id=store.parent_run_id)
    outcome = TrialOutcome("g0", {}, "TERMINATED", search_run_id="forged", genotype=other)
    state.search = SearchState(["g0"], [outcome])
    pipe = Pipeline(cfg, tmp_path, state, store, True, print, 0)
    with pytest.raises(PipelineError, match="genotype of trial g0 is not the one its search run"):
        pipe._checked_genotype("g0", outcome)  # what retrain_jobs() checks for each selected key
    outcome.genotype = good  # the recorded one: retrained, lineage from the store's run id
    assert pipe._checked_genotype("g0", outcome) == run.run_id


# ----------------------------------------------------------------------------------------------
# 2. Digests of what --resume unpickles live in the tracking store


def test_a_planted_pickle_with_its_sha_in_state_json_is_refused(env, tmp_path, capsys):
    exp = tmp_path / "run" / "ray" / "search"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"fine": True}))
    legit = storage_digests(str(tmp_path / "run" / "ray"))
    tags = digest_tags({k: [v] for k, v in legit.items()}, legit)
    for k, v in tags.items():  # what the run recorded as Tune wrote it
        env.client().set_tag(env.parent_run_id, k, v)
    marker = tmp_path / "code-ran"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))  # the attacker's file...
    planted = storage_digests(str(tmp_path / "run" / "ray"))  # ... and its sha in state.json
    state = RunState(
        parent_run_id=env.parent_run_id, tune_files={k: [v] for k, v in planted.items()}
    )
    run_dir = _resumable(tmp_path / "run", state)
    before = _tree(tmp_path)
    assert main(_args(run_dir, "--resume", "--stages", "search")) == EXIT["usage"]
    err = capsys.readouterr().err
    assert "search/tuner.pkl" in err and "not recorded in the tracking store" in err, err
    assert not marker.exists() and _tree(tmp_path) == before
    assert store_digests(env.uri, env.parent_run_id)["search/tuner.pkl"] == [
        legit["search/tuner.pkl"]
    ]
    # A parent run the store does not hold (state.json edited to another id) is refused too.
    RunState(parent_run_id="0" * 32, tune_files=state.tune_files).save(run_dir)
    assert main(_args(run_dir, "--resume", "--stages", "search")) == EXIT["usage"]
    assert "does not hold" in capsys.readouterr().err


def test_digest_tags_round_trip_any_file_name():
    names = {"search/t00_k=1,x=[2]/params.pkl": ["a" * 64, "b" * 64], "search/tuner.pkl": ["c"]}
    tags = digest_tags(names, names)
    assert all(len(k) < 250 and k.replace(".", "").replace("_", "").isalnum() for k in tags)
    assert digests_from_tags({**tags, "rarn.tune_sha256.bad": "{", "other": "x"}) == names


def test_a_planted_commit_is_not_resumed_from(tmp_path, caplog):
    trial = TrialStore(tmp_path / "t00")
    recorded: list[str] = []

    def record(digest: str) -> None:  # the tracking store hears of it before it appears
        assert trial.latest() is None
        recorded.append(digest)

    trial.work.mkdir(parents=True)
    (trial.work / "checkpoint.pt").write_bytes(b"weights 1")
    assert recorded == [commit_digest(trial.commit(1, record=record))]
    assert trial.restore(None, "t00", recorded)["epoch"] == 1
    _commit(trial, 2)  # self-consistent (its own digests match), but never recorded in MLflow
    assert trial.restore(None, "t00", recorded) is None
    assert "not recorded in the tracking store" in caplog.text
    assert list(trial.work.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# 3. The tracking URI comes from the config or the environment, and the token goes nowhere else


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records every request's path and headers; answers per ``routes`` (path -> status)."""

    seen: list[tuple[str, dict[str, str]]]
    routes: dict[str, int] = {}
    location = ""

    def do_GET(self):  # noqa: N802
        self.seen.append((self.path, dict(self.headers)))
        status = self.routes.get(self.path.split("?")[0], 200)
        self.send_response(status)
        if self.location:
            self.send_header("Location", self.location)
        self.end_headers()
        self.wfile.write(b"{}")

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    started = []

    def start(routes=None, location=""):
        handler = type(
            "H", (_Recorder,), {"seen": [], "routes": routes or {}, "location": location}
        )
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler.seen

    yield start
    for srv in started:
        srv.shutdown()


def _no_ray(monkeypatch, **stage_effects):
    """Replace Ray and the stages: what is left is the CLI's own path through tracking."""
    from pipeline import run, stages

    monkeypatch.setattr(run, "_init_ray", lambda args: False)
    monkeypatch.setattr(run, "_check_cluster", lambda *a: [])
    for name in ("search", "retrain", "evaluate", "register"):
        monkeypatch.setattr(stages.Pipeline, name, stage_effects.get(name, lambda self: None))


def test_state_json_cannot_redirect_tracking_or_the_token(
    env, tmp_path, monkeypatch, server, capsys
):
    url, seen = server()
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cret")
    _no_ray(monkeypatch)
    run_dir = tmp_path / "run"
    assert main(_args(run_dir, "--stages", "evaluate")) == EXIT["ok"]
    for forged in (url, f"{url}/api", "not a uri", "file:///tmp/x"):
        state = json.loads((run_dir / "state.json").read_text())
        (run_dir / "state.json").write_text(json.dumps(state | {"tracking_uri": forged}))
        assert main(_args(run_dir, "--stages", "evaluate", "--resume")) == EXIT["ok"]
        assert json.loads((run_dir / "state.json").read_text())["tracking_uri"] == env.uri
    out = capsys.readouterr().out
    assert url not in out and seen == []  # not one request, so no token, went there
    # The configured server gets the token; a redirect is answered, not followed with it.
    other, seen_other = server()
    here, seen_here = server({"/health": 302}, location=f"{other}/health")
    with pytest.raises(TrackingUnavailable, match="redirect"):
        check_reachable(here)
    assert seen_here[0][1]["Authorization"] == "Bearer s3cret" and seen_other == []


# ----------------------------------------------------------------------------------------------
# 4. Values the registry or Ray would refuse late, unusable run directories: exit 2 at load


@pytest.mark.parametrize(
    "override",
    ["tracking.alias=latest", "tracking.alias=LATEST", "tracking.alias=v1", "tracking.alias=V12",
     "tracking.registered_model=a/b", "tracking.registered_model=a:b",
     "tracking.registered_model=..", "tracking.registered_model=' '"],
)  # fmt: skip
def test_names_the_registry_refuses_are_refused_at_load(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(SMOKE, [override])


def test_a_yaml_merge_key_cannot_repeat_a_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("search: {epochs: 2, <<: {epochs: 300}}\n")
    with pytest.raises(ConfigError, match=r"line 1: YAML merge keys \(<<\) are not allowed"):
        load_config(path)


def test_unusable_run_dirs_and_cpus_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "file").write_text("x")
    cases = {
        str(tmp_path / "file"): "not a directory",
        str(tmp_path / "file" / "run"): "is a file",
        "/dev/null": "not a directory",
        str(tmp_path / ("r" * 300)): "longer than the file system allows",
    }
    for run_dir, needle in cases.items():
        assert main(_args(Path(run_dir))) == EXIT["usage"], run_dir
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    for extra in (["--num-cpus=-1"], ["--num-cpus=0"], ["tracking.alias=latest"]):
        assert main(_args(tmp_path / "run", *extra)) == EXIT["usage"]
        assert extra[0].split("=")[0] in capsys.readouterr().err
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as root, chmod would not deny
    assert main(_args(tmp_path / "sub" / "run")) == EXIT["usage"]
    assert "not writable (permission denied)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ----------------------------------------------------------------------------------------------
# 5. Bounded waits, our own one-line messages


def test_an_unreachable_ray_address_exits_2_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1", "nonsense"):
        monkeypatch.setenv("RAY_ADDRESS", address)
        t0 = time.monotonic()
        assert main(_args(tmp_path / "run")) == EXIT["usage"]
        err = capsys.readouterr().err.strip()
        assert time.monotonic() - t0 < 15 and "RAY_ADDRESS=" in err and address in err
        assert len(err.splitlines()) == 1 and "--resume" not in err
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("RARN_RAY_CONNECT_TIMEOUT_S", "-3")
    assert main(_args(tmp_path / "run")) == EXIT["usage"]
    assert "RARN_RAY_CONNECT_TIMEOUT_S" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_ray_address_that_never_answers_times_out(monkeypatch):
    import socket

    from pipeline.cluster import check_ray_address

    waited = []

    def blackhole(address, timeout):
        waited.append(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", blackhole)
    monkeypatch.setenv("RARN_RAY_CONNECT_TIMEOUT_S", "0.5")
    with pytest.raises(ConfigError, match=r"no Ray cluster answers there \(timed out, 0.5 s\)"):
        check_ray_address("10.0.0.9:6379")
    assert waited == [0.5]


def test_a_server_whose_api_fails_exits_3_bounded(tmp_path, monkeypatch, server, capsys):
    from pipeline import registry

    url, seen = server({"/health": 200, "/api/2.0/mlflow/experiments/search": 500})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    t0 = time.monotonic()
    assert main(_args(tmp_path / "run")) == EXIT["tracking"]
    err = capsys.readouterr().err.strip()
    assert "API (experiments/search) answered HTTP 500" in err and len(err.splitlines()) == 1
    assert "--resume" not in err and list(tmp_path.iterdir()) == []
    assert registry.main(["--tracking-uri", url, "show", "m@champion"]) == 3
    assert "HTTP 500" in capsys.readouterr().err
    assert time.monotonic() - t0 < 10 and len(seen) == 4
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # MLflow's own calls bounded


def test_a_tracking_failure_mid_run_is_one_line_and_advises_resume_only_after_a_write(
    env, tmp_path, monkeypatch, capsys
):
    from mlflow.exceptions import MlflowException

    def fail(self):
        raise MlflowException("API request to endpoint failed with error code 500 != 200")

    _no_ray(monkeypatch, evaluate=fail)
    assert main(_args(tmp_path / "run", "--stages", "evaluate")) == EXIT["tracking"]
    err = capsys.readouterr().err.strip()
    assert "failed during the run" in err and "--resume" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# 6. File-system faults: a message naming the path, exit 1, a state to resume from


def test_disk_full_is_reported_with_the_path_and_the_state_stays_resumable(
    env, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    full = run_dir / "evaluation" / "t00" / "results.parquet"

    def disk_full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(full))

    _no_ray(monkeypatch, evaluate=disk_full)
    assert main(_args(run_dir, "--stages", "evaluate")) == EXIT["failed"]
    err = capsys.readouterr().err.strip()
    assert f"No space left on device: {full}" in err and "--resume" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    saved = RunState.load(run_dir)  # the last save is intact
    assert env.client().get_run(saved.parent_run_id).info.status == "FAILED"
    # A save that hits the full disk leaves the previous state.json whole (atomic replace).
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name.startswith(".state.json.tmp"):
            real(self, "{half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(OSError, match="No space left"):
        RunState(parent_run_id="changed").save(run_dir)
    assert RunState.load(run_dir).parent_run_id == saved.parent_run_id
    assert [p.name for p in run_dir.iterdir() if ".tmp" in p.name] == []

    # Wrapped (as Tune and Ray re-raise), read-only (EROFS), permission denied (EACCES): alike.
    def wrapped(self):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(full))
        except OSError as e:
            raise RuntimeError("Tune: saving the experiment state failed") from e

    _no_ray(monkeypatch, evaluate=wrapped)
    monkeypatch.setattr(Path, "write_text", real)
    assert main(_args(run_dir, "--stages", "evaluate", "--resume")) == EXIT["failed"]
    assert f"No space left on device: {full}" in capsys.readouterr().err
    for code in (errno.EROFS, errno.EACCES):
        _no_ray(monkeypatch, evaluate=lambda self, c=code: (_ for _ in ()).throw(
            OSError(c, os.strerror(c), str(full))))  # fmt: skip
        monkeypatch.setattr(Path, "write_text", real)
        assert main(_args(run_dir, "--stages", "evaluate", "--resume")) == EXIT["failed"]
        assert f"{os.strerror(code)}: {full}" in capsys.readouterr().err


def test_checkpoint_errors_are_not_swallowed_as_corruption():
    assert issubclass(UnsafeCheckpointPath, CheckpointCorrupted)
    assert issubclass(UnsafeCheckpointPath, ValueError)  # the CLI's exit 2
