"""Reaching Ray and reserving a replica's resources.

`connect` joins the cluster named by `address` or `RAY_ADDRESS`, or starts a local one bound to loopback
(see MACHINE-NOTES: a driver that resolves 127.0.0.1 to the machine's outside address hangs). A replica's
workers live in one placement group: the one the caller already runs in (a Serve replica's, whose bundle 0
is the replica itself), or one made here and removed again by `release`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


def connect(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:
        logger.info("No Ray address given: starting a local Ray cluster.")
        # Ray starts workers at nice 15 by default; here the workers are the model, and at low priority
        # they lose their cores to every proxy and client on the node (their OpenMP teams then stall).
        os.environ.setdefault("RAY_worker_niceness", "0")
        # address="local": a new cluster, never one a crashed run left behind.
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=False)


@dataclass
class Placement:
    group: PlacementGroup
    first_bundle: int        # bundles [first_bundle, first_bundle + world_size) hold the workers
    owned: bool              # made here, so removed here

    def strategy(self, rank: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group,
                                                placement_group_bundle_index=self.first_bundle + rank,
                                                placement_group_capture_child_tasks=True)

    def release(self) -> None:
        if self.owned:
            ray.util.remove_placement_group(self.group)


def reserve(world_size: int, use_gpu: bool, cpus_per_worker: float, strategy: str,
            timeout_s: float = 120.0) -> Placement:
    """One bundle per rank: {"GPU": 1} each on GPUs, `cpus_per_worker` CPUs each otherwise. Bundles are in
    rank order, so PACK places a stage's tensor ranks together before spilling to the next node."""
    current = get_current_placement_group()
    if current is not None:
        first = len(current.bundle_specs) - world_size
        if first < 0:
            raise ValueError(f"The placement group this replica runs in has {len(current.bundle_specs)} bundles; "
                             f"its {world_size} workers need {world_size} of them.")
        return Placement(current, first, owned=False)
    bundle = {"GPU": 1.0} if use_gpu else {}
    if cpus_per_worker > 0:
        bundle["CPU"] = cpus_per_worker
    group = placement_group([dict(bundle) for _ in range(world_size)], strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise RuntimeError(f"Ray could not place {world_size} workers of {bundle} each ({strategy}) within "
                           f"{timeout_s:.0f} s; the cluster has {ray.available_resources()} available.")
    return Placement(group, 0, owned=True)
