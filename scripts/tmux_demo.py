#!/usr/bin/env python3
"""Drive the real ``dnet-console --demo`` under tmux, as a person would.

    scripts/tmux_demo.py [--timeout 180] [--keep-screens DIR]

Starts the console in a detached tmux session, waits until both demo peers and the
placement are on screen with the model loaded and each peer holding some of its
layers, opens the chat (F2), asks a question, waits for the answer's usage line,
checks that the answer is English (the default model is a real one), quits
(Ctrl+Q), and checks that the console exited and that the peers it started are
gone. Prints the screens it saw; exits 1 (saying at which step) if any step does
not happen in time or a check fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


def tmux(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30)


def screen(session: str) -> str:
    return tmux("capture-pane", "-t", session, "-p").stdout


def wait_for(session: str, what: str, check, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        if tmux("has-session", "-t", session).returncode != 0:
            raise SystemExit(f"tmux_demo: the console exited while waiting for {what}\n{text}")
        text = screen(session)
        if check(text):
            print(f"--- {what} ---\n{text}", flush=True)
            return text
        time.sleep(0.5)
    raise SystemExit(f"tmux_demo: no {what} within {timeout:.0f}s; the screen was:\n{text}")


QUESTION = "What is the capital of France?"
# Words any short English answer to it uses; random weights' output has none.
ENGLISH = {"the", "a", "is", "of", "and", "to", "in", "it", "i", "you", "capital", "france",
           "paris", "city", "its", "as", "for", "with", "that", "this", "are", "be"}  # fmt: skip


def peers_holding_layers(screen: str) -> list[str]:
    """The demo peers whose row in the devices table ends with a layer range."""
    return [
        name
        for name in ("demo-0", "demo-1")
        if any(
            name in line and re.search(r"\d+–\d+\s*[│|]?\s*$", line) for line in screen.splitlines()
        )
    ]


def answer_text(screen: str) -> str:
    """What the chat shows between the question and the settings row."""
    lines = screen.splitlines()
    start = max((i for i, line in enumerate(lines) if QUESTION in line), default=-1)
    end = next(
        (i for i in range(start + 1, len(lines)) if "temperature" in lines[i] or "╰" in lines[i]),
        len(lines),
    )
    return " ".join(line.strip(" │▌▐|") for line in lines[start + 1 : end]).strip()


def looks_english(text: str) -> bool:
    words = re.findall(r"[a-z']+", text.lower())
    return len(words) >= 3 and sum(w in ENGLISH for w in words) >= 2


def processes_mentioning(path: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if path in cmdline:
                found.append(f"{proc.name}: {cmdline}")
    return found


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--timeout", type=float, default=180)
    args = p.parse_args()
    if shutil.which("tmux") is None:
        print("tmux_demo: tmux is not installed", file=sys.stderr)
        return 2
    session = f"dnet-demo-{uuid.uuid4().hex[:8]}"
    # The demo's files (peer state, logs) land here; no process may mention it after.
    scratch = tempfile.mkdtemp(prefix="dnet-tmux-")
    command = f"env TMPDIR={scratch} {sys.executable} -m dnet.cli_console --demo --http-port 0"
    started = time.monotonic()
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "48", command)
    try:
        wait_for(
            session,
            "devices, placement, the loaded model and each peer's layers",
            lambda s: (
                "placement over" in s
                and "state loaded" in s
                and peers_holding_layers(s) == ["demo-0", "demo-1"]
            ),
            args.timeout,
        )
        tmux("send-keys", "-t", session, "F2")
        wait_for(session, "the chat", lambda s: "Enter sends" in s, 30)
        # Greedy, so the check does not hang on a sample: back from the message box
        # to the temperature (past max tokens), 0.7 -> 0, and forward again.
        for key in ("BTab", "BTab", "End", "BSpace", "BSpace", "BSpace", "0"):
            tmux("send-keys", "-t", session, key)
            time.sleep(0.2)
        wait_for(session, "temperature 0", lambda s: re.search(r"temperature\W+0\s", s), 10)
        for key in ("Tab", "Tab"):
            tmux("send-keys", "-t", session, key)
            time.sleep(0.2)
        tmux("send-keys", "-t", session, "-l", QUESTION)
        tmux("send-keys", "-t", session, "Enter")
        shown = wait_for(session, "an answer", lambda s: "answer tokens" in s, 120)
        answer = answer_text(shown)
        if not looks_english(answer):
            raise SystemExit(f"tmux_demo: the answer is not English: {answer!r}")
        print(f"tmux_demo: the answer: {answer}")
        tmux("send-keys", "-t", session, "C-q")
        deadline = time.monotonic() + 30
        while tmux("has-session", "-t", session).returncode == 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"tmux_demo: the console did not quit\n{screen(session)}")
            time.sleep(0.2)
        time.sleep(0.5)
        left = processes_mentioning(scratch)
        if left:
            raise SystemExit("tmux_demo: processes outlived the console:\n" + "\n".join(left))
        print(f"tmux_demo: ok in {time.monotonic() - started:.1f}s")
        return 0
    finally:
        tmux("kill-session", "-t", session)
        for log in sorted(Path(scratch).glob("*/console.log")):
            print(f"--- {log.name} (last lines) ---", file=sys.stderr)
            print("\n".join(log.read_text().splitlines()[-15:]), file=sys.stderr)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
