#!/usr/bin/env python3
"""The README's recorded curl session: run it against a head, write it, or check it.

    scripts/curl_session.py --api URL                  # print a fresh transcript
    scripts/curl_session.py --api URL --write README.md  # record it into the README
    scripts/curl_session.py --api URL --check README.md  # exit 1 if the README differs

The head must have the default model (``smollm2-135m``, as the demo loads it)
loaded. The commands run through ``curl`` (and ``python3 -m json.tool``) in a shell
when curl is installed, otherwise the same requests go through urllib. Comparing,
ids, times and the address are masked: everything else, the generated text
included, must match what the server returns.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

API = "http://127.0.0.1:8080"
# The default model's short name (dnet.models.packaged.DEFAULT_MODEL).
MODEL = "smollm2-135m"
START, END = "<!-- curl-session:start -->", "<!-- curl-session:end -->"
JSON_TOOL = " | python3 -m json.tool"
_CHAT = f"curl -s {API}/v1/chat/completions -H 'Content-Type: application/json'"

COMMANDS = [
    f"curl -s {API}/health",
    f"curl -s {API}/v1/models" + JSON_TOOL,
    f"""{_CHAT} -d '{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 32, "temperature": 0}}'"""
    + JSON_TOOL,
    f"""curl -sN {API}/v1/chat/completions -H 'Content-Type: application/json' -d '{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Say hello."}}], "max_tokens": 4, "temperature": 0, "stream": true, "stream_options": {{"include_usage": true}}}}'""",
    f"""{_CHAT} -d '{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "n": 2}}'"""
    + JSON_TOOL,
    f"""{_CHAT} -d '{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "Hi"}}]}}'"""
    + JSON_TOOL,
]

_MASKS = [
    (re.compile(r"(chatcmpl|cmpl)-[0-9a-f]{32}"), r"\1-ID"),
    (re.compile(r'"created": ?\d+'), '"created": TIME'),
    (re.compile(r"http://[0-9.]+:\d+"), API),
]


def _urllib(command: str, api: str) -> str:
    """What the curl command prints, without curl (the subset the session uses)."""
    pretty = command.endswith(JSON_TOOL)
    args = shlex.split(command.removesuffix(JSON_TOOL))
    url, data, headers = "", None, {}
    i = 1
    while i < len(args):
        if args[i] == "-d":
            data, i = args[i + 1].encode(), i + 2
        elif args[i] == "-H":
            name, value = args[i + 1].split(":", 1)
            headers[name.strip()] = value.strip()
            i += 2
        elif args[i].startswith("-"):
            i += 1
        else:
            url, i = args[i].replace(API, api), i + 1
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
    return json.dumps(json.loads(body), indent=4) + "\n" if pretty else body


def run(command: str, api: str) -> str:
    if shutil.which("curl"):
        done = subprocess.run(
            command.replace(API, api), shell=True, capture_output=True, text=True, timeout=60
        )
        return done.stdout
    return _urllib(command, api)


def transcript(api: str) -> str:
    parts = []
    for command in COMMANDS:
        output = run(command, api).rstrip("\n")
        parts.append(f"$ {command}\n{output}\n")
    return "```console\n" + "\n".join(parts) + "```\n"


def normalise(text: str) -> str:
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def _block(readme: str) -> tuple[int, int]:
    start, end = readme.index(START) + len(START) + 1, readme.index(END)
    return start, end


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--api", default=API)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="README")
    group.add_argument("--check", type=Path, metavar="README")
    args = p.parse_args()
    fresh = transcript(args.api)
    if args.write is None and args.check is None:
        print(fresh, end="")
        return 0
    path = args.write or args.check
    readme = path.read_text()
    start, end = _block(readme)
    if args.write is not None:
        # The address as a reader's would be.
        path.write_text(readme[:start] + fresh.replace(args.api, API) + readme[end:])
        return 0
    recorded = readme[start:end]
    if normalise(recorded) == normalise(fresh):
        print("the README's curl session matches the server")
        return 0
    import difflib

    sys.stdout.writelines(
        difflib.unified_diff(
            normalise(recorded).splitlines(True),
            normalise(fresh).splitlines(True),
            "README",
            "server",
        )
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
