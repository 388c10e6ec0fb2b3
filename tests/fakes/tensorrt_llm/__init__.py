"""FAKE ``tensorrt_llm`` for CPU tests. It is NOT TensorRT-LLM.

It implements only the surface rackbench documents and uses
(scripts/rackbench/contracts/trtllm_1_2.yaml): ``LLM(model=..., **llm_args)``,
``LLM.generate(token_id_batch, sampling_params, use_tqdm=...)`` returning
objects whose ``.outputs[0].token_ids`` are the generated ids,
``LLM.shutdown()``, ``SamplingParams`` and ``_tensorrt_engine.LLM``.
Every keyword rackbench passes is checked against the spec file, so an
argument the real 1.2.x API would reject fails here too.

Generation is a deterministic function of the prompt: token i of the answer
is ``3 + (sum(prompt) + 7 * i) % 997``; the answer is ``len(prompt) % 5 + 1``
tokens followed by ``end_id`` (the EOS id is included in token_ids, the worst
case for the caller, which must strip it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

__version__ = "1.2.1"
FAKE = True

SPEC_PATH = Path(__file__).resolve().parents[3] / "scripts" / "rackbench" / "contracts" / "trtllm_1_2.yaml"
_SPEC = yaml.safe_load(SPEC_PATH.read_text())

#: Every LLM constructed in this process, for assertions: (class name, kwargs, CUDA_VISIBLE_DEVICES)
CONSTRUCTED: list = []


def _check_fields(values: dict, spec_fields: dict, where: str) -> None:
    for key, value in values.items():
        if key not in spec_fields:
            raise TypeError(f"{where}: unexpected argument {key!r} (extra='forbid')")
        spec = spec_fields[key]
        if value is None and spec.get("nullable"):
            continue
        if spec.get("type") == "object":
            if not isinstance(value, dict):
                raise TypeError(f"{where}.{key} must be a mapping")
            _check_fields(value, spec["fields"], f"{where}.{key}")
        elif spec.get("type") == "choice" and value not in spec["choices"]:
            raise ValueError(f"{where}.{key}={value!r} not in {spec['choices']}")
        elif spec.get("type") == "float":
            if not isinstance(value, (int, float)):
                raise TypeError(f"{where}.{key} must be a float")
            if "min" in spec and not spec["min"] <= value <= spec["max"]:
                raise ValueError(f"{where}.{key}={value} outside [{spec['min']}, {spec['max']}]")
        elif spec.get("type") == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{where}.{key} must be an int, got {value!r}")
        elif spec.get("type") == "bool" and not isinstance(value, bool):
            raise TypeError(f"{where}.{key} must be a bool, got {value!r}")


@dataclass
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    n: int = 1
    detokenize: bool = True
    exclude_input_from_output: bool = True
    ignore_eos: bool = False

    def __post_init__(self):
        names = {f.name for f in fields(self)}
        assert names <= set(_SPEC["sampling_params"]["fields"]), "fake drifted from spec"
        if self.pad_id is None:
            self.pad_id = self.end_id


@dataclass
class CompletionOutput:
    index: int
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list
    outputs: list


def fake_answer(prompt, params: SamplingParams) -> tuple[list[int], str]:
    n = len(prompt) % 5 + 1
    ids = [3 + (sum(prompt) + 7 * i) % 997 for i in range(n)]
    if params.end_id is not None and not params.ignore_eos:
        ids.append(params.end_id)
    if len(ids) > params.max_tokens:
        return ids[:params.max_tokens], "length"
    return ids, "stop"


class LLM:
    """Fake of ``tensorrt_llm.LLM`` (the PyTorch-backend LLM API)."""

    def __init__(self, model, **kwargs):
        _check_fields({"model": model, **kwargs}, _SPEC["llm_args"]["fields"], type(self).__name__)
        if not Path(model).exists():
            raise FileNotFoundError(f"model {model} does not exist")
        self.model = str(model)
        self.kwargs = kwargs
        self.cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.closed = False
        self.calls = 0
        CONSTRUCTED.append((type(self).__name__, dict(kwargs), self.cuda_visible_devices))

    def generate(self, inputs, sampling_params=None, use_tqdm=True):
        if self.closed:
            raise RuntimeError("LLM is shut down")
        params = sampling_params or SamplingParams()
        unbatched = not isinstance(inputs, list) or (inputs and isinstance(inputs[0], int))
        batch = [inputs] if unbatched else inputs
        outs = []
        for i, prompt in enumerate(batch):
            if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
                raise TypeError("fake LLM.generate only takes token-id prompts (list[int])")
            ids, reason = fake_answer(prompt, params)
            outs.append(RequestOutput(request_id=self.calls * 100000 + i, prompt_token_ids=prompt,
                                      outputs=[CompletionOutput(0, ids, reason)]))
        self.calls += 1
        return outs[0] if unbatched else outs

    def shutdown(self):
        self.closed = True
