"""A pooling model resolved once: which runner, what it outputs, which tasks it serves, how it pools.

The engine resolves this when it loads the model and hands it to the workers with the `ModelSource`.
Pooling and its defaults come, in this order of precedence, from the user's `pooler_config`, the model's
Sentence Transformers files, and the architecture.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from shardserve.models.registry import resolve_model_class, resolve_runner
from shardserve.models.sentence_transformers import SentenceTransformersConfig, read_sentence_transformers_config
from shardserve.pooler_config import SEQUENCE_POOLING_TYPES, PoolerConfig

# What each kind of pooling model serves; the first task is what `LLM.encode` does by default.
_KIND_TASKS = {"embed": ("embed", "token_embed"), "classify": ("classify", "token_classify"),
               "reward": ("token_classify",)}
# The architecture's defaults under everything else: normalised embeddings, activated classifications.
_ARCHITECTURE_DEFAULTS = PoolerConfig(normalize=True, use_activation=True)


@dataclass
class PoolingModelConfig:
    kind: str                         # "embed" | "classify" | "reward": what the model outputs
    tasks: tuple[str, ...]            # the pooling tasks it serves, its default first
    sequence_pooling: str             # CLS | MEAN | LAST, for embed / classify / score
    token_pooling: str                # ALL | STEP, for token_embed / token_classify
    defaults: PoolerConfig            # per-request defaults: normalize, use_activation, dimensions, step ids
    sentence_transformers: SentenceTransformersConfig | None = None
    position_limit: int | None = None  # the longest prompt the positions allow, where not max_position_embeddings

    @property
    def default_task(self) -> str:
        return self.tasks[0]

    def max_model_len(self, position_limit: int | None) -> tuple[int | None, int | None]:
        """(hard limit, default) of the model length given the config's position limit: an offset in the
        position table (RoBERTa) lowers the limit; Sentence Transformers' max_seq_length is the default, as
        it is what the model was trained and is used with."""
        limit = self.position_limit or position_limit
        st = self.sentence_transformers
        default = st.max_seq_length if st is not None and st.max_seq_length else limit
        return limit, min(default, limit) if default and limit else default or limit


def _tasks(kind: str, hf_config) -> tuple[str, ...]:
    tasks = _KIND_TASKS[kind]
    # A one-label classifier scores sentence pairs (a cross-encoder).
    if kind == "classify" and getattr(hf_config, "num_labels", 2) == 1:
        tasks = tasks[:1] + ("score",) + tasks[1:]
    return tasks


def resolve_pooling_model(source, runner: str = "auto", convert: str = "auto", task: str | None = None,
                          pooler_config: PoolerConfig | dict | str | None = None) -> PoolingModelConfig | None:
    """The pooling setup of `source` (a ModelSource), or None when it runs as a generation model."""
    runner, kind = resolve_runner(source.hf_config, runner, convert, task)
    user = PoolerConfig.parse(pooler_config)
    if runner == "generate":
        if user is not None:
            raise ValueError("pooler_config applies to pooling models; this model runs with runner='generate'.")
        return None
    model_cls = resolve_model_class(source.hf_config, "pooling", kind)
    st = None if source.is_gguf or not os.path.isdir(source.path) else \
        read_sentence_transformers_config(source.path)
    user = user or PoolerConfig()
    if user.pooling_type in SEQUENCE_POOLING_TYPES:
        sequence_pooling, token_pooling = user.pooling_type, "ALL"
    else:
        token_pooling = user.pooling_type or "ALL"
        if st is not None and st.unsupported_pooling is not None:
            raise ValueError(f"The model's Sentence Transformers pooling mode {st.unsupported_pooling!r} is not "
                             f"supported (CLS, MEAN and LAST are); pass pooler_config={{'pooling_type': ...}} "
                             f"to choose one explicitly.")
        sequence_pooling = (st.pooler.pooling_type if st is not None else None) or model_cls.default_pooling_type
    defaults = user.merged_over(st.pooler if st is not None else PoolerConfig()).merged_over(_ARCHITECTURE_DEFAULTS)
    defaults.pooling_type = None  # resolved into the two pooling types above
    position_limit = getattr(model_cls, "max_model_len", None)
    return PoolingModelConfig(kind=kind, tasks=_tasks(kind, source.hf_config), sequence_pooling=sequence_pooling,
                              token_pooling=token_pooling, defaults=defaults, sentence_transformers=st,
                              position_limit=position_limit(source.hf_config) if position_limit else None)
