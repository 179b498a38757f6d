"""The executor seam: how the engine reaches its workers. One call per step, whatever the layout."""
from __future__ import annotations

from collections.abc import Callable

from shardserve.engine.scheduler import SchedulerOutput
from shardserve.workers.model_runner import ModelRunnerOutput


class Executor:
    # Whether `launch_model` can return before the step's tokens are back (async scheduling).
    supports_launch = False

    def collective_rpc(self, method: str, *args) -> list:
        """Call a `Worker` method on every worker; their results in rank order. The engine's own calls: any
        failure ends the replica."""
        raise NotImplementedError

    def call_workers(self, method: str | Callable, args: tuple = (), kwargs: dict | None = None,
                     timeout: float | None = None) -> list:
        """A caller's call on every worker (`LLM.collective_rpc`): `Worker.execute_method` with the results in
        rank order. An exception the method raised is raised as it is (the replica keeps serving); a worker
        that died ends the replica; past `timeout` seconds (where the executor can wait apart from the
        workers) TimeoutError, the call still running there."""
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
