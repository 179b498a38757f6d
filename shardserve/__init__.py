"""shardserve: vLLM's interfaces and engine as a distributed, actor-based serving cluster on Ray."""
from shardserve.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from shardserve.entrypoints.llm import LLM
from shardserve.inputs import EmbedsPrompt, TextPrompt, TokensPrompt
from shardserve.outputs import CompletionOutput, Logprob, RequestOutput
from shardserve.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "TextPrompt",
           "TokensPrompt", "EmbedsPrompt", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence",
           "__version__"]
