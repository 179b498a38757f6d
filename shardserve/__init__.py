"""shardserve: vLLM's interfaces and engine as a distributed, actor-based serving cluster on Ray."""
from shardserve.logger import configure_logging

configure_logging()

from shardserve.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from shardserve.entrypoints.llm import LLM
from shardserve.inputs import EmbedsPrompt, TextPrompt, TokensPrompt
from shardserve.outputs import (ClassificationOutput, ClassificationRequestOutput, CompletionOutput, EmbeddingOutput,
                                EmbeddingRequestOutput, Logprob, PoolingOutput, PoolingRequestOutput, RequestOutput,
                                ScoringOutput, ScoringRequestOutput)
from shardserve.pooler_config import PoolerConfig
from shardserve.pooling_params import PoolingParams
from shardserve.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "TextPrompt", "TokensPrompt", "EmbedsPrompt", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence",
           "PoolingParams", "PoolerConfig", "PoolingOutput", "PoolingRequestOutput", "EmbeddingOutput",
           "EmbeddingRequestOutput", "ClassificationOutput", "ClassificationRequestOutput", "ScoringOutput",
           "ScoringRequestOutput", "__version__"]
