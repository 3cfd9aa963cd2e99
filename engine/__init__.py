"""kubellm.engine: the inference engine (paged-KV continuous batching) and `kubellm serve`."""

if __name__ != "kubellm.engine":
    raise ImportError("engine/ is the package kubellm.engine; import it by that name")

from kubellm.engine.outputs import CompletionOutput, OutputKind, RequestOutput
from kubellm.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "LLMEngine", "OutputKind", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    # LLM and LLMEngine pull in torch and the model code: load them on first use only.
    if name == "LLM":
        from kubellm.engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from kubellm.engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)
