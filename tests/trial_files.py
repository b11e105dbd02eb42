"""Reading a search trial's own files (pipeline.checkpoints.TrialStore) from the tests."""

from __future__ import annotations

import json
from pathlib import Path


def committed_epoch(trial: Path) -> int:
    """The epoch of the trial's latest commit (0 before the first)."""
    try:
        name = (trial / "LATEST").read_text().strip()
        return json.loads((trial / name / "progress.json").read_text())["epoch"]
    except (OSError, ValueError):
        return 0


def start_epochs(trial: Path) -> list[int]:
    """The epoch each attempt of the trial started from, in order."""
    lines = (trial / "attempts.jsonl").read_text().splitlines()
    return [json.loads(ln)["start_epoch"] for ln in lines]
