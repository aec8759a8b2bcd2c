"""The head process runs no layers, so it never loads MLX: a running
``dnet-console --headless`` with a model loaded and a request served has no MLX
library mapped and no MLX (nor mlx_lm, nor transformers) module imported."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from .conftest import start_cluster, stop_cluster

HEAVY = ("mlx", "mlx_lm", "transformers", "torch")

# Loaded by the head's interpreter at start (``sitecustomize``): on exit it writes
# the heavy modules it imported to the file the test names.
REPORTER = textwrap.dedent(
    f"""
    import atexit, os, sys

    def _report():
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        with open(os.environ["DNET_TEST_MODULES"], "w") as out:
            out.write("\\n".join(["exited"] + heavy))

    atexit.register(_report)
    """
)


def _mapped(pid: int) -> list[str]:
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in lines if "mlx" in line.split()[-1].lower()})


def test_a_head_serving_a_model_never_loads_mlx(tiny_model, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(REPORTER)
    report = tmp_path / "modules.txt"
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    model = tiny_model(arch="qwen3", layers=4, hidden=64)
    c = start_cluster(
        tmp_path / "c",
        model,
        2,
        "--model",
        str(model),
        console_env={
            "PYTHONPATH": path,
            "DNET_TEST_MODULES": str(report),
            "DNET_CACHE_DIR": str(tmp_path / "cache"),
        },
    )
    try:
        c.wait(lambda: c.get("/health").json()["state"] == "loaded", 60, "the model loads")
        answer = c.post(
            "/v1/chat/completions",
            {"model": str(model), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
        assert _mapped(c.console.proc.pid) == []
        # The model was hashed once, into the head's cache (peers fetch by it).
        assert len(list((tmp_path / "cache" / "manifests").glob("*.json"))) == 1
        # The peers do load it: the check can see a mapped MLX.
        assert _mapped(c.peers[0].proc.pid) != []
    finally:
        stop_cluster(c)
    assert report.read_text().splitlines() == ["exited"]
