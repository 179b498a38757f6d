"""The in-process executor: one worker, TP = PP = 1."""
from __future__ import annotations

from collections.abc import Callable

from shardserve.config import EngineConfig
from shardserve.engine.scheduler import SchedulerOutput
from shardserve.executor.base import Executor
from shardserve.models.source import ModelSource
from shardserve.workers.model_runner import ModelRunnerOutput
from shardserve.workers.worker import worker_class


class UniprocExecutor(Executor):
    supports_launch = True

    def __init__(self, config: EngineConfig, source: ModelSource):
        self.worker = worker_class(config.worker_extension_cls)(config, source)

    def collective_rpc(self, method: str, *args) -> list:
        return [getattr(self.worker, method)(*args)]

    def call_workers(self, method: str | Callable, args: tuple = (), kwargs: dict | None = None,
                     timeout: float | None = None) -> list:
        # In this process the call runs on the caller's thread: there is nothing to wait on apart (as vLLM's
        # in-process executor, `timeout` is not applied).
        return [self.worker.execute_method(method, args, kwargs)]

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
