#!/usr/bin/env python3
"""Download a model from the Hugging Face hub into the local HF cache (explicit step).

scripts/download_model.py mlx-community/Qwen3-0.6B-bf16
"""

from __future__ import annotations

import argparse
import sys

from dnet.models.model_dir import download_model


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("repo", help="org/name on the hub")
    p.add_argument("--revision")
    a = p.parse_args()
    print(download_model(a.repo, a.revision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
