from .engine import EngineConfig, LLMEngine
from .llm import LLM
from .request import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingError, SamplingParams

__all__ = ["CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "Logprob", "RequestOutput", "SamplingError",
           "SamplingParams"]
