"""How the engine reaches its workers: in process, or as Ray actors."""
from __future__ import annotations

from shardserve.config import EngineConfig
from shardserve.executor.base import Executor
from shardserve.models.source import ModelSource


def create_executor(config: EngineConfig, source: ModelSource) -> Executor:
    if config.distributed_executor_backend == "ray":
        from shardserve.executor.ray import RayExecutor  # Ray is imported only when used
        return RayExecutor(config, source)
    from shardserve.executor.uniproc import UniprocExecutor
    return UniprocExecutor(config, source)
