"""The README's recorded curl session is what a head with the demo model answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attrs

from dnet.runtime.tiny import DEMO_SPEC

from .conftest import start_cluster, stop_cluster

ROOT = Path(__file__).parents[2]


def test_the_readme_curl_session_matches_the_server(tiny_model, tmp_path):
    model = tiny_model(**attrs.asdict(DEMO_SPEC))
    assert model.name == DEMO_SPEC.key
    assert f'MODEL = "{DEMO_SPEC.key}"' in (ROOT / "scripts" / "curl_session.py").read_text()
    c = start_cluster(tmp_path, model, 2, "--model", str(model))
    try:
        c.wait(lambda: c.get("/health").json()["state"] == "loaded", 60, "the model loads")
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
            timeout=120,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        stop_cluster(c)
