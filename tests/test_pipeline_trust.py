"""Trust boundaries and exclusive runs: nothing here needs Ray (the CLI refuses before it starts).

A run directory is locked by the run that owns it; Ray Tune's pickles are restored only when this
run wrote them; a failed pre-flight (bad tracking URI, refused credentials, corrupt
``state.json``) exits with nothing written.
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.run import EXIT, main
from pipeline.runlock import LOCK_FILE, RunDirLock, RunDirLocked, lock_holder
from pipeline.state import RunState
from pipeline.tune_state import (
    UntrustedTuneState,
    digest_recorder,
    merge_digests,
    storage_digests,
    verify_storage,
)
from rarn.config import dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
HOST = socket.gethostname()


def _args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE, "--quiet", f"run_dir={run_dir}", *extra]


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock until it is killed."""
    code = (
        "import sys, time; from pipeline.runlock import RunDirLock; "
        f"RunDirLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(300)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "locked"
    return p


# ----------------------------------------------------------------------------------------------
# The run directory's lock


def test_a_second_run_on_a_locked_run_dir_names_the_holder(tmp_path, monkeypatch, capsys, reaper):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    p = _holder(run_dir)
    reaper.track_tree(p.pid)
    for extra in ([], ["--resume"]):
        assert main(_args(run_dir, *extra)) == EXIT["usage"]
        err = capsys.readouterr().err
        assert f"PID {p.pid}" in err and HOST in err and "in use" in err, err
    assert [q.name for q in run_dir.iterdir()] == [LOCK_FILE]  # nothing written
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(RunDirLocked, match=f"PID {p.pid} on host {HOST}"):
        RunDirLock(run_dir).acquire()  # the lock itself, past the pre-flight's check
    p.kill()
    p.wait()
    assert lock_holder(run_dir) is None  # the kernel dropped it with the process


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": HOST}))
    said = []
    lock = RunDirLock(run_dir, said.append).acquire()
    assert said and f"stale lock of PID {dead.pid}" in said[0]
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_FILE).exists()
    # A lock file from another host cannot be checked from here: refused, with what to do.
    (run_dir / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunDirLocked, match="PID 1 on host elsewhere.*delete"):
        RunDirLock(run_dir).acquire()


# ----------------------------------------------------------------------------------------------
# Ray Tune's pickles


def _resumable_run(tmp_path: Path, tune_files: dict[str, list[str]] | None = None) -> Path:
    """A run directory that --resume accepts up to the search: config.yaml and state.json."""
    run_dir = tmp_path / "run"
    cfg = load_config(SMOKE, [f"run_dir={run_dir}"])
    run_dir.mkdir(exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    RunState(tune_files=tune_files or {}).save(run_dir)
    return run_dir


class _RunsCode:
    """A pickle that runs code when loaded: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_tuner_pkl_is_refused_and_never_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    legit = tmp_path / "legit.pkl"
    legit.write_bytes(pickle.dumps({"fine": True}))
    exp = tmp_path / "run" / "ray" / "search"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(legit.read_bytes())
    recorded = merge_digests({}, storage_digests(str(tmp_path / "run" / "ray")))
    assert list(recorded) == ["search/tuner.pkl"]
    run_dir = _resumable_run(tmp_path, recorded)
    marker = tmp_path / "code-ran"
    (exp / "tuner.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))  # the attacker's file
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = main(_args(run_dir, "--resume", "--stages", "search"))
    err = capsys.readouterr().err
    assert rc == EXIT["usage"], err
    assert "refused" in err and "search/tuner.pkl" in err and "delete" in err
    assert not marker.exists()  # the code never ran
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "mlflow.db").exists()


def test_tune_digests_cover_what_restore_unpickles(tmp_path):
    storage = tmp_path / "ray"
    exp = storage / "search"
    files = {
        "tuner.pkl": b"a",
        "experiment_state-1.json": b"{}",
        "basic-variant-state-1.json": b"{}",
        "t00/params.pkl": b"b",
        "t00/error.pkl": b"c",
        "t00/result.json": b"{}",  # plain JSON rows: not unpickled
        "t00/checkpoint_000001/progress.json": b"{}",  # our own, digest-checked checkpoint
    }
    for name, data in files.items():
        (exp / name).parent.mkdir(parents=True, exist_ok=True)
        (exp / name).write_bytes(data)
    (storage / "retrain-t00").mkdir()
    (storage / "retrain-t00" / "checkpoint_manager_snapshot.json").write_text("{}")  # not Tune
    digests = storage_digests(str(storage))
    assert sorted(digests) == sorted(
        f"search/{n}" for n in ("tuner.pkl", "experiment_state-1.json",
                                "basic-variant-state-1.json", "t00/params.pkl", "t00/error.pkl")
    )  # fmt: skip
    recorded = merge_digests({}, digests)
    verify_storage(str(storage), recorded)  # what the run wrote: accepted
    (exp / "t00" / "params.pkl").write_bytes(b"other")
    with pytest.raises(UntrustedTuneState, match="search/t00/params.pkl"):
        verify_storage(str(storage), recorded)
    recorded = merge_digests(recorded, storage_digests(str(storage)))
    verify_storage(str(storage), recorded)
    (exp / "t00" / "new.pkl").write_bytes(b"planted")
    with pytest.raises(UntrustedTuneState, match="search/t00/new.pkl"):
        verify_storage(str(storage), recorded)
    (exp / "t00" / "new.pkl").unlink()
    # Another run's experiment in a shared storage is not this run's to restore ...
    (storage / "other").mkdir()
    (storage / "other" / "tuner.pkl").write_bytes(b"theirs")
    assert storage_digests(str(storage), "search") == digests | {
        "search/t00/params.pkl": recorded["search/t00/params.pkl"][0]
    }
    verify_storage(str(storage), recorded)
    # ... but with nothing recorded (killed before Tune started), every experiment is checked.
    with pytest.raises(UntrustedTuneState, match="other/tuner.pkl"):
        verify_storage(str(storage), {})


def test_digest_recorder_hashes_tunes_staging_folder(tmp_path):
    staging = tmp_path / "driver_artifacts"
    (staging / "t00").mkdir(parents=True)
    (staging / "experiment_state-1.json").write_text("{}")
    (staging / "t00" / "params.pkl").write_bytes(b"p")

    class Storage:
        experiment_driver_staging_path = str(staging)
        experiment_dir_name = "search"

    class Trial:
        storage = Storage()

    got: list[dict[str, str]] = []
    cb = digest_recorder(got.append)
    cb.on_step_end(iteration=1, trials=[Trial()])
    assert sorted(got[0]) == ["search/experiment_state-1.json", "search/t00/params.pkl"]
    cb.on_step_end(iteration=2, trials=[Trial()])
    assert len(got) == 1  # nothing changed, nothing recorded
    (staging / "experiment_state-1.json").write_text('{"x": 1}')
    cb.on_step_end(iteration=3, trials=[Trial()])
    assert list(got[1]) == ["search/experiment_state-1.json"]


def test_a_save_the_driver_died_before_recording_resumes_from_the_recorded_version(tmp_path):
    """The race seen in test_pipeline_multinode (SIGKILL between Tune's save and the record):
    the recorder keeps a copy of each recorded version; ``--resume`` accepts an unrecorded file
    only when that copy's digest is recorded, and puts the copy back in its place."""
    import hashlib

    staging, storage, keep = tmp_path / "staging", tmp_path / "storage", tmp_path / "kept"
    staging.mkdir()
    state = staging / "experiment_state-1.json"
    state.write_text('{"v": 1}')

    class Storage:
        experiment_driver_staging_path = str(staging)
        experiment_dir_name = "search-x"

    class Trial:
        storage = Storage()

    recorded: dict[str, list[str]] = {}
    cb = digest_recorder(lambda d: [recorded.setdefault(k, []).append(v) for k, v in d.items()],
                         keep)  # fmt: skip
    cb.on_step_end(iteration=1, trials=[Trial()])
    name = "search-x/experiment_state-1.json"
    assert (keep / name).read_text() == '{"v": 1}'
    (storage / "search-x").mkdir(parents=True)
    (storage / "search-x/tuner.pkl").write_bytes(b"t")
    recorded["search-x/tuner.pkl"] = [hashlib.sha256(b"t").hexdigest()]
    (storage / name).write_text('{"v": 2}')  # saved and uploaded; the driver died: no record
    with pytest.raises(UntrustedTuneState, match="experiment_state-1.json"):
        verify_storage(str(storage), recorded)  # no kept copies: refused as before
    verify_storage(str(storage), recorded, snapshots=keep)  # pre-flight: reads only
    assert (storage / name).read_text() == '{"v": 2}'
    verify_storage(str(storage), recorded, snapshots=keep, restore=True)
    assert (storage / name).read_text() == '{"v": 1}'  # the recorded version is back
    # A kept copy counts only with a recorded digest: a planted copy is refused.
    (storage / name).write_text('{"v": 3}')
    (keep / name).write_text('{"planted": 1}')
    with pytest.raises(UntrustedTuneState, match="experiment_state-1.json"):
        verify_storage(str(storage), recorded, snapshots=keep, restore=True)
    assert (storage / name).read_text() == '{"v": 3}'  # nothing written on refusal


# ----------------------------------------------------------------------------------------------
# Pre-flight failures write nothing


def test_bad_tracking_scheme_writes_nothing_and_the_run_dir_stays_usable(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://127.0.0.1:5000")
    rc = main(_args(tmp_path / "run"))
    assert rc == EXIT["usage"]
    assert "unknown scheme 'htp'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no run_dir, no config.yaml, no state.json
    # An existing empty run_dir stays empty too, so a corrected rerun can use it.
    (tmp_path / "run").mkdir()
    assert main(_args(tmp_path / "run")) == EXIT["usage"]
    assert list((tmp_path / "run").iterdir()) == []


class _AuthServer(http.server.BaseHTTPRequestHandler):
    """An MLflow server that is up but refuses our credentials."""

    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/health" else 401)
        self.end_headers()
        self.wfile.write(b"OK" if self.path == "/health" else b"unauthorized")

    def log_message(self, *args):
        pass


def test_refused_credentials_exit_3_and_write_nothing(tmp_path, monkeypatch, capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), _AuthServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.chdir(tmp_path)
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "me")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        assert main(_args(tmp_path / "run")) == EXIT["tracking"]
        err = capsys.readouterr().err
        assert "refused the credentials (HTTP 401)" in err and "wrong" not in err
        assert list(tmp_path.iterdir()) == []
    finally:
        server.shutdown()


def test_corrupt_state_json_names_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = _resumable_run(tmp_path)
    (run_dir / "state.json").write_text('{"search": {"done": tru')
    assert main(_args(run_dir, "--resume")) == EXIT["usage"]
    err = capsys.readouterr().err
    assert f"{run_dir / 'state.json'}: not a readable run state" in err
    assert "Traceback" not in err
