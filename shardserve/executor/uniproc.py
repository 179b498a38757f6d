"""The in-process executor: one worker, TP = PP = 1."""
from __future__ import annotations

from collections.abc import Callable

from shardserve.config import EngineConfig
from shardserve.engine.scheduler import SchedulerOutput
from shardserve.executor.base import Executor
from shardserve.models.source import ModelSource
from shardserve.workers.model_runner import ModelRunnerOutput
from shardserve.workers.worker import Worker


class UniprocExecutor(Executor):
    supports_launch = True

    def __init__(self, config: EngineConfig, source: ModelSource):
        self.worker = Worker(config, source)

    def collective_rpc(self, method: str, *args) -> list:
        return [getattr(self.worker, method)(*args)]

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def launch_model(self, scheduler_output: SchedulerOutput) -> Callable[[], ModelRunnerOutput]:
        step = self.worker.execute_model(scheduler_output, non_block=True)
        if isinstance(step, ModelRunnerOutput):
            return lambda: step
        return lambda: self.worker.runner.collect(step)
