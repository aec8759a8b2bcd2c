"""``dnet-console --headless`` as a user starts it: --model loads at start-up, and
SIGTERM stops it promptly even with an idle keep-alive connection open."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from .conftest import start_cluster, stop_cluster


def test_model_given_at_start_is_loaded_and_sigterm_is_prompt(tiny_model, tmp_path):
    model = tiny_model(arch="qwen3")
    c = start_cluster(tmp_path, model, 1, "--model", str(model))
    try:
        c.wait(lambda: c.get("/health").json()["state"] == "loaded", 60, "the model loads")
        answer = OpenAI(base_url=c.url + "/v1", api_key="x", max_retries=0).chat.completions
        got = answer.create(
            model=model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert got.model == str(model)  # named by its directory name; answered with its id
        # The helper script prepares and loads again through the API.
        script = Path(__file__).parents[2] / "scripts" / "prepare_model.py"
        run = subprocess.run(
            [sys.executable, str(script), str(model), "--api", c.url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        assert f"ready: {model}" in run.stdout and "layers   0-4" in run.stdout
        bad = subprocess.run(
            [sys.executable, str(script), "/no/such/model", "--api", c.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "no model at /no/such/model" in bad.stderr
        with httpx.Client() as keep_alive:
            assert keep_alive.get(c.url + "/health").status_code == 200
            started = time.monotonic()
            c.console.proc.send_signal(signal.SIGTERM)
            code = c.console.proc.wait(15)
            stopped = time.monotonic() - started
        assert code == 0
        assert stopped < 5, f"took {stopped:.1f}s to stop"
    finally:
        stop_cluster(c)
