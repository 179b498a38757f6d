"""The package's log lines (start-up facts: attention backend, KV cache blocks, GPU memory, CUDA graphs, Ray
placement) go to stderr at INFO, as vLLM's do. SHARDSERVE_CONFIGURE_LOGGING=0 leaves logging to the
application; SHARDSERVE_LOGGING_LEVEL sets the level (default INFO)."""
from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    if os.environ.get("SHARDSERVE_CONFIGURE_LOGGING", "1") == "0":
        return
    logger = logging.getLogger("shardserve")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("SHARDSERVE_LOGGING_LEVEL", "INFO").upper())
    logger.propagate = False  # a root handler the application adds would print every line twice
