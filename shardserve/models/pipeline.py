"""Pipeline stages inside a model: which layers this stage holds, and placeholders for the rest.

Parameter names stay global (`model.layers.7...` is layer 7 on whichever stage holds it), so the loader
streams one checkpoint into any stage and skips the tensors of layers that live elsewhere.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from shardserve.distributed.parallel_state import get_pp_group

# Activations a stage hands to the next: e.g. {"hidden": ..., "residual": ...}.
IntermediateTensors = dict[str, torch.Tensor]

_LAYER_PARTITION: list[int] | None = None


def set_layer_partition(partition: list[int] | None) -> None:
    """Layers per stage, e.g. [10, 14]; None splits evenly (earlier stages take the remainder)."""
    global _LAYER_PARTITION
    _LAYER_PARTITION = list(partition) if partition else None


def split_layers(num_layers: int, num_stages: int, partition: list[int] | None = None) -> list[tuple[int, int]]:
    if partition is None:
        base, extra = divmod(num_layers, num_stages)
        partition = [base + (i < extra) for i in range(num_stages)]
    if len(partition) != num_stages or sum(partition) != num_layers or min(partition) < 1:
        raise ValueError(f"Layer partition {partition} does not split {num_layers} layers into {num_stages} "
                         f"non-empty pipeline stages.")
    bounds, start = [], 0
    for n in partition:
        bounds.append((start, start + n))
        start += n
    return bounds


class PPMissingLayer(nn.Identity):
    """A module that another pipeline stage holds: no parameters here."""


def make_layers(num_layers: int, build: Callable[[int], nn.Module]) -> tuple[int, int, nn.ModuleList]:
    """This stage's layers at their global indices, placeholders elsewhere; returns (start, end, layers)."""
    pp = get_pp_group()
    start, end = split_layers(num_layers, pp.size, _LAYER_PARTITION)[pp.rank_in_group]
    layers = nn.ModuleList(build(i) if start <= i < end else PPMissingLayer() for i in range(num_layers))
    return start, end, layers


def on_first_stage(build: Callable[[], nn.Module]) -> nn.Module:
    return build() if get_pp_group().is_first else PPMissingLayer()


def on_last_stage(build: Callable[[], nn.Module]) -> nn.Module:
    return build() if get_pp_group().is_last else PPMissingLayer()


def tie_head(head: nn.Module, embedding: nn.Module, tied: bool) -> None:
    """Share the embedding matrix with the LM head when both live on this stage (always, without PP)."""
    if tied and get_pp_group().size == 1:
        head.tie_to(embedding)


def tied_head_weights(weights: Iterable[tuple[str, torch.Tensor]], tied: bool, embed_name: str,
                      head_name: str) -> tuple[Iterable[tuple[str, torch.Tensor]], tuple[str, ...]]:
    """The checkpoint stream and the names to skip for a model whose head may be tied to its embedding.

    Tied and on one stage, the head's own tensor (if the checkpoint has one) is redundant. Tied across
    stages, the last stage has no embedding to share: it loads the embedding matrix as its head."""
    if not tied:
        return weights, ()
    if get_pp_group().size == 1:
        return weights, (head_name,)

    def untied() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name == embed_name:
                yield head_name, tensor
            yield name, tensor
    return untied(), ()
