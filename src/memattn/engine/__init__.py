"""The serving engine: continuous batching over the paged KV cache (scheduler, model runner, sampler, models)."""
from .config import EngineConfig, ModelConfig, SamplingParams
from .llm import LLM, CompletionOutput, RequestOutput, StreamEvent

__all__ = ["LLM", "SamplingParams", "EngineConfig", "ModelConfig", "RequestOutput", "CompletionOutput",
           "StreamEvent"]
