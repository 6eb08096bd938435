"""The engine: `from engine import LLM, SamplingParams`."""

from engine.beam_search import BeamSearchOutput, BeamSearchParams
from engine.llm import LLM
from engine.lora import LoRARequest
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.pooling import EmbeddingRequestOutput, PoolerConfig, PoolingParams
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.structured_output import StructuredOutputsParams

__all__ = [
    "LLM",
    "BeamSearchOutput",
    "BeamSearchParams",
    "CompletionOutput",
    "EmbeddingRequestOutput",
    "LoRARequest",
    "Logprob",
    "PoolerConfig",
    "PoolingParams",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
]
