"""llama.cpp for benchmarks, in a virtual environment of its own: ``llama-cpp-python``
built from source (``--no-binary``; about six minutes on 2 cores) on first use under
the cache directory, never part of dnet's install or tests. ``decode_rate`` runs a
GGUF file there and returns llama.cpp's greedy decode rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

VERSION = "0.3.36"

# Run inside the llama.cpp environment: greedy decode of N tokens after a prompt,
# timed per token after the first (the same measure as dnet's side).
_RUNNER = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, n, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
            verbose=False, seed=0)
ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
runs = []
for _ in range(int(sys.argv[5])):
    llm.reset()
    start = time.perf_counter()
    first, out = None, []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if first is None:
            first = time.perf_counter()
        out.append(token)
        if len(out) >= n:
            break
    end = time.perf_counter()
    runs.append({"ttft_s": first - start, "decode_tok_s": (len(out) - 1) / (end - first),
                 "tokens": out})
print(json.dumps({"prompt_tokens": len(ids), "runs": runs}))
"""


def environment(cache_dir: Path) -> Path:
    """The Python of the llama.cpp environment, made (and llama-cpp-python built
    from source) on first use."""
    root = cache_dir / "bench" / f"llama-cpp-{VERSION}"
    python = root / "bin" / "python"
    marker = root / "built"
    if marker.exists():
        return python
    print(f"building llama-cpp-python {VERSION} from source in {root} (minutes)", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    env = dict(
        os.environ,
        CMAKE_ARGS="-DGGML_NATIVE=ON",
        CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2),
    )
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-binary", "llama-cpp-python",
         f"llama-cpp-python=={VERSION}"],
        check=True,
        env=env,
    )  # fmt: skip
    marker.write_text(VERSION)
    return python


def decode_rate(
    cache_dir: Path, gguf: Path, prompt: str, n: int, threads: int, repeats: int
) -> dict:
    """llama.cpp's runs on ``gguf``: time to first token, decode tokens/s, tokens."""
    python = environment(cache_dir)
    out = subprocess.run(
        [str(python), "-c", _RUNNER, str(gguf), str(threads), str(n), prompt, str(repeats)],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(environment(Path(sys.argv[1])))
