"""FAKE ``tensorrt_llm._tensorrt_engine`` (the TensorRT-engine LLM class). Not TensorRT-LLM."""

from pathlib import Path

from tensorrt_llm import LLM as _FakeTorchLLM


class LLM(_FakeTorchLLM):
    """Fake ``_TrtLLM``: the model must be an engine directory (config.json + rank*.engine)."""

    def __init__(self, model, **kwargs):
        if not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a TensorRT-LLM engine directory (no config.json)")
        super().__init__(model, **kwargs)


__all__ = ["LLM"]
