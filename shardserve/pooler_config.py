"""`PoolerConfig`: how a pooling model turns hidden states into outputs, as a user overrides it.

Every field left None falls through to the next source, in this order: the user's `pooler_config`, the
model's Sentence Transformers files, the architecture's default.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

# Sequence pooling picks or averages rows into one vector; token pooling keeps rows.
SEQUENCE_POOLING_TYPES = ("CLS", "MEAN", "LAST")
TOKEN_POOLING_TYPES = ("ALL", "STEP")
POOLING_TYPES = SEQUENCE_POOLING_TYPES + TOKEN_POOLING_TYPES


@dataclass
class PoolerConfig:
    pooling_type: str | None = None
    normalize: bool | None = None         # default `use_activation` of embedding requests
    use_activation: bool | None = None    # default `use_activation` of classification / score requests
    dimensions: int | None = None         # default `dimensions` of embedding requests
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None:
            self.pooling_type = str(self.pooling_type).upper()
            if self.pooling_type not in POOLING_TYPES:
                raise ValueError(f"Unknown pooling_type {self.pooling_type!r}; choose one of "
                                 f"{', '.join(POOLING_TYPES)}.")

    @classmethod
    def parse(cls, value: PoolerConfig | dict | str | None) -> PoolerConfig | None:
        """A PoolerConfig, a dict of its fields, or the same as a JSON string (the CLI's form)."""
        if value is None or isinstance(value, PoolerConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"pooler_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise TypeError(f"pooler_config must be a PoolerConfig, a dict or a JSON object string, got "
                            f"{type(value).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"Unknown pooler_config field(s) {', '.join(unknown)}; valid fields: "
                             f"{', '.join(sorted(names))}.")
        return cls(**value)

    def merged_over(self, fallback: PoolerConfig) -> PoolerConfig:
        """These fields where set, the fallback's elsewhere."""
        return PoolerConfig(**{f.name: getattr(fallback, f.name) if getattr(self, f.name) is None
                               else getattr(self, f.name) for f in dataclasses.fields(self)})
