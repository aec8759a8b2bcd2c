"""The real ``dnet-console --demo`` driven under tmux (skipped where tmux is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "tmux_demo.py"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_the_demo_under_tmux_splits_the_real_model_and_answers_in_english(tmp_path):
    env = dict(os.environ, DNET_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "tmux_demo: ok" in run.stdout
    assert "demo-0" in run.stdout and "placement over" in run.stdout
    assert "split: no single peer can hold the whole model" in run.stdout
    assert "tmux_demo: the answer: " in run.stdout  # checked to be English by the script
