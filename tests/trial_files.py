"""Reading a search trial's (or a retraining rank's) own commit files from the tests."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.checkpoints import PROGRESS, TrialStore


def committed_epoch(trial: Path) -> int:
    """The last epoch a trial (or a retraining's rank 0) committed in its folder; 0 before the
    first (what the tests wait on before killing something)."""
    latest = TrialStore(trial).latest()
    try:
        return json.loads((latest / PROGRESS).read_text())["epoch"] if latest else 0
    except (OSError, ValueError):  # a commit replaced while reading it
        return 0


def start_epochs(trial: Path) -> list[int]:
    """The epoch each attempt of the trial started from (``attempts.jsonl``), in order."""
    lines = (trial / "attempts.jsonl").read_text().splitlines()
    return [json.loads(ln)["start_epoch"] for ln in lines]


def attempt_nodes(trial: Path) -> list[str | None]:
    """The Ray node (IP) each attempt of the trial ran on (``attempts.jsonl``), in order."""
    lines = (trial / "attempts.jsonl").read_text().splitlines()
    return [json.loads(ln).get("node_ip") for ln in lines]
