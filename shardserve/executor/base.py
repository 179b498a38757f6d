"""The executor seam: how the engine reaches its workers. One call per step, whatever the layout."""
from __future__ import annotations

from collections.abc import Callable

from shardserve.engine.scheduler import SchedulerOutput
from shardserve.workers.model_runner import ModelRunnerOutput


class Executor:
    # Whether `launch_model` can return before the step's tokens are back (async scheduling).
    supports_launch = False

    def collective_rpc(self, method: str, *args) -> list:
        """Call a `Worker` method on every worker; their results in rank order."""
        raise NotImplementedError

    def determine_num_blocks(self) -> int:
        raise NotImplementedError

    def init_kv_cache(self, num_blocks: int) -> None:
        raise NotImplementedError

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        raise NotImplementedError

    def launch_model(self, scheduler_output: SchedulerOutput) -> Callable[[], ModelRunnerOutput]:
        """Start a step and return what waits for its output (executors with `supports_launch` only)."""
        raise NotImplementedError

    def check_health(self) -> None:
        """Raise if a worker is gone. In process there is nothing to lose."""

    def shutdown(self) -> None:
        pass
