"""The package's on-disk cache: $SHARDSERVE_CACHE_DIR, else $XDG_CACHE_HOME/shardserve (~/.cache/shardserve).

What lives there is derived and rebuilt when missing: the compiled CPU kernels (layers/cpu_kernels.py), the
Hugging Face config and tokenizer converted from a GGUF file's metadata (models/gguf.py).
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    root = os.environ.get("SHARDSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "shardserve")
    return Path(root) / kind
