"""Request bodies of the pooling routes: OpenAI's embeddings, vLLM's /pooling, /classify, /score and
/rerank, and Cohere's /v2/embed. Each turns into the engine's `PoolingParams`; range checks stay there and in
the processor, so the offline and online APIs refuse the same things with the same words."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from shardserve.pooling_params import PoolingParams
from shardserve.router.protocol import OpenAIBase


class PoolingBaseRequest(OpenAIBase):
    model: str | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: Literal["left", "right"] | None = None   # "left" keeps the last tokens
    use_activation: bool | None = None
    priority: int = 0   # as the completion routes' (protocol.SamplingRequest)

    def to_pooling_params(self, task: str | None, **fields) -> PoolingParams:
        return PoolingParams(task=task, truncate_prompt_tokens=self.truncate_prompt_tokens,
                             truncation_side=self.truncation_side, use_activation=self.use_activation, **fields)


class InputRequest(PoolingBaseRequest):
    """`input` as a string, strings, token ids or lists of them; or vLLM's chat form, one conversation."""
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False


class EmbeddingRequest(InputRequest):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class PoolingRequest(EmbeddingRequest):
    task: str | None = None   # embed, classify, score, token_embed, token_classify; None: the model's first


class ClassificationRequest(InputRequest):
    pass


class ScoreRequest(PoolingBaseRequest):
    """One text against many, or pairwise: `text_1`/`text_2`, also named `queries`/`documents` or
    `data_1`/`data_2` as in vLLM."""
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = Field(default=None, exclude=True)
    documents: str | list[str] | None = Field(default=None, exclude=True)
    data_1: str | list[str] | None = Field(default=None, exclude=True)
    data_2: str | list[str] | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _one_naming(self) -> ScoreRequest:
        named = [(a, b) for a, b in ((self.text_1, self.text_2), (self.queries, self.documents),
                                     (self.data_1, self.data_2)) if a is not None or b is not None]
        if len(named) != 1 or None in named[0]:
            raise ValueError("give the two sides as text_1 and text_2 (or queries and documents)")
        self.text_1, self.text_2 = named[0]
        return self


class RerankRequest(PoolingBaseRequest):
    query: str
    documents: list[str]
    top_n: int = Field(default=0, ge=0)          # 0: all documents
    return_documents: bool = True


class CohereEmbedRequest(OpenAIBase):
    model: str | None = None
    texts: list[str] | None = None
    images: list[str] | None = None
    inputs: list[dict[str, Any]] | None = None          # [{"content": [{"type": "text", "text": ...}]}]
    input_type: str | None = None                        # a key of the model's prompts
    embedding_types: list[Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]] | None = None
    output_dimension: int | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    max_tokens: int | None = Field(default=None, ge=1)   # truncate (or, with NONE, refuse) past this many tokens
