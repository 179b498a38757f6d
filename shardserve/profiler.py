"""vLLM's profiling of the workers: `LLM(profiler_config={"profiler": "torch", "torch_profiler_dir": DIR})`, then
`LLM.start_profile()` / `stop_profile()` around the calls to look at. Each worker records the steps in between
with torch's profiler and writes one Chrome trace (Perfetto, TensorBoard) into DIR, named after its pipeline
stage and tensor rank.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

import torch

logger = logging.getLogger(__name__)

ACTIVITIES = {"CPU": torch.profiler.ProfilerActivity.CPU, "CUDA": torch.profiler.ProfilerActivity.CUDA}


@dataclass(frozen=True)
class ProfilerConfig:
    """The fields of vLLM's profiler_config this engine has (its Triton Proton and CUDA profilers it has not).
    `delay_iterations` worker steps pass before recording starts; recording stops by itself after
    `max_iterations` steps (0: at stop_profile)."""
    profiler: str | None = None
    torch_profiler_dir: str = ""
    torch_profiler_activities: tuple[str, ...] | None = None  # None: CPU, and CUDA on a GPU
    torch_profiler_with_stack: bool = True
    torch_profiler_with_flops: bool = False
    torch_profiler_use_gzip: bool = True
    torch_profiler_record_shapes: bool = False
    torch_profiler_with_memory: bool = False
    delay_iterations: int = 0
    max_iterations: int = 0

    @classmethod
    def parse(cls, config: ProfilerConfig | dict | None) -> ProfilerConfig:
        if isinstance(config, ProfilerConfig):
            return config
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"profiler_config has no field {', '.join(unknown)} here (its fields: "
                             f"{', '.join(sorted(known))}).")
        if config.get("torch_profiler_activities") is not None:
            config["torch_profiler_activities"] = tuple(config["torch_profiler_activities"])
        parsed = cls(**config)
        parsed.check()
        return parsed

    def check(self) -> None:
        if self.profiler not in (None, "torch"):
            raise ValueError(f"profiler {self.profiler!r} is not available: the workers profile with torch's "
                             f"profiler ('torch').")
        if self.profiler == "torch" and not self.torch_profiler_dir:
            raise ValueError("profiler_config needs torch_profiler_dir, the folder the traces are written to.")
        bad = sorted(set(self.torch_profiler_activities or ()) - set(ACTIVITIES))
        if bad:
            raise ValueError(f"torch_profiler_activities: {', '.join(bad)} is not one of {', '.join(ACTIVITIES)}.")
        check_iterations(self.delay_iterations, self.max_iterations)


def check_iterations(delay_iterations: int | None, max_iterations: int | None) -> None:
    for name, value in (("delay_iterations", delay_iterations), ("max_iterations", max_iterations)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


class WorkerProfiler:
    """One worker's recording: started (after a delay of steps) and stopped by the engine's calls, counted by
    the worker's steps."""

    def __init__(self, config: ProfilerConfig, worker_name: str, device: torch.device):
        self.config = config
        self.worker_name = worker_name
        names = config.torch_profiler_activities or (("CPU", "CUDA") if device.type == "cuda" else ("CPU",))
        self.activities = [ACTIVITIES[n] for n in names]
        self.profile: torch.profiler.profile | None = None
        self.active = False   # between start_profile and stop_profile (or the last of max_iterations)
        self.delay = self.limit = self.steps = 0

    def start(self, prefix: str | None, delay_iterations: int | None, max_iterations: int | None) -> None:
        if self.active:
            logger.info("start_profile while profiling: ignored")
            return
        check_iterations(delay_iterations, max_iterations)
        self.delay = self.config.delay_iterations if delay_iterations is None else delay_iterations
        self.limit = self.config.max_iterations if max_iterations is None else max_iterations
        self.name = f"{prefix}_{self.worker_name}" if prefix else self.worker_name
        self.active, self.steps = True, 0
        if self.delay == 0:
            self._record()

    def step(self) -> None:
        """After each of the worker's steps."""
        if not self.active:
            return
        self.steps += 1
        if self.profile is None and self.steps == self.delay:
            self._record()
        elif self.profile is not None and self.limit and self.steps - self.delay >= self.limit:
            self.stop()

    def stop(self) -> None:
        self.active = False
        if self.profile is not None:
            self.profile.stop()  # writes the trace (on_trace_ready)
            self.profile = None
            logger.info("Profile written to %s", self.config.torch_profiler_dir)

    def _record(self) -> None:
        c = self.config
        os.makedirs(c.torch_profiler_dir, exist_ok=True)
        self.profile = torch.profiler.profile(
            activities=self.activities, record_shapes=c.torch_profiler_record_shapes,
            profile_memory=c.torch_profiler_with_memory, with_stack=c.torch_profiler_with_stack,
            with_flops=c.torch_profiler_with_flops,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(c.torch_profiler_dir, self.name,
                                                                    use_gzip=c.torch_profiler_use_gzip))
        self.profile.start()
