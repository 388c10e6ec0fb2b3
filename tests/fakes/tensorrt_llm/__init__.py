"""FAKE ``tensorrt_llm`` for CPU tests. It is NOT TensorRT-LLM.

It implements only the surface rackbench documents and uses
(scripts/rackbench/contracts/trtllm_1_2.yaml): ``LLM(model=..., **llm_args)``,
``LLM.generate_async(token_ids, sampling_params=..., streaming=...)`` returning a
``RequestOutput`` (a GenerationResult: ``result()``, ``aresult()``, ``await``, sync
and async iteration, one step per response; ``.outputs[0].token_ids`` accumulating
the generated ids), ``LLM.generate(token_id_batch, sampling_params, use_tqdm=...)``
(generate_async per prompt with streaming=False, then ``result()``, as the real one),
``LLM.shutdown()``, ``SamplingParams`` and ``_tensorrt_engine.LLM``.
A fake executor thread answers the requests: a streamed request gets one response
per token, a non-streamed one a single final response. As in TensorRT-LLM, the
asyncio side (``aresult``, ``async for``) works only for a result created inside a
running event loop.
Every keyword rackbench passes is checked against the spec file, so an
argument the real 1.2.x API would reject fails here too.

Generation is a deterministic function of the prompt: token i of the answer
is ``3 + (sum(prompt) + 7 * i) % 997``; the answer is ``len(prompt) % 5 + 1``
tokens followed by ``end_id`` (the EOS id is included in token_ids, the worst
case for the caller, which must strip it).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
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


class RequestOutput:
    """Fake of ``tensorrt_llm.llmapi.llm.RequestOutput`` (a ``GenerationResult``)."""

    def __init__(self, request_id: int, prompt_token_ids: list, params: "SamplingParams", streaming: bool):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = params
        self._streaming = streaming
        self._done = False
        self.outputs = [CompletionOutput(0)]
        try:  # GenerationResultBase: an AsyncQueue only under a running event loop
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self.aqueue = asyncio.Queue() if self._loop is not None else None
        self.queue = queue.Queue() if self._loop is None else None

    @property
    def finished(self) -> bool:
        return self._done

    # the fake executor's side
    def _deliver(self, response) -> None:
        if self.aqueue is not None:
            self._loop.call_soon_threadsafe(self.aqueue.put_nowait, response)
        else:
            self.queue.put(response)

    def _handle_response(self, response) -> None:
        token_ids, is_final, finish_reason = response
        if isinstance(token_ids, BaseException):
            raise token_ids
        self.outputs[0].token_ids.extend(token_ids)  # non-beam: output.token_ids.extend(...)
        self._done = is_final
        if is_final:
            self.outputs[0].finish_reason = finish_reason

    # GenerationResult
    def result(self, timeout: float | None = None) -> "RequestOutput":
        while not self._done:
            if self.aqueue is not None:  # the real one reads aqueue.sync_q
                response = asyncio.run_coroutine_threadsafe(self.aqueue.get(), self._loop).result(timeout)
            else:
                response = self.queue.get(timeout=timeout)
            self._handle_response(response)
        return self

    async def _aresult_step(self) -> None:
        assert self.aqueue is not None, (
            "The asyncio event loop was not present during initialization, so async operations are not available."
        )
        self._handle_response(await self.aqueue.get())

    async def aresult(self) -> "RequestOutput":
        while not self._done:
            await self._aresult_step()
        return self

    def __await__(self):
        return self.aresult().__await__()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        self._handle_response(
            self.queue.get()
            if self.queue is not None
            else asyncio.run_coroutine_threadsafe(self.aqueue.get(), self._loop).result()
        )
        return self

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        await self._aresult_step()
        return self


def fake_answer(prompt, params: SamplingParams) -> tuple[list[int], str]:
    n = len(prompt) % 5 + 1
    ids = [3 + (sum(prompt) + 7 * i) % 997 for i in range(n)]
    if params.end_id is not None and not params.ignore_eos:
        ids.append(params.end_id)
    if len(ids) > params.max_tokens:
        return ids[: params.max_tokens], "length"
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
        self.async_requests: list = []  # (prompt, streaming) per generate_async call
        self._next_id = 0
        self._requests: queue.Queue = queue.Queue()
        self._executor = threading.Thread(target=self._execute, name="fake-trtllm-executor", daemon=True)
        self._executor.start()
        CONSTRUCTED.append((type(self).__name__, dict(kwargs), self.cuda_visible_devices))

    def generate_async(
        self,
        inputs,
        sampling_params=None,
        lora_request=None,
        prompt_adapter_request=None,
        streaming=False,
        kv_cache_retention_config=None,
        disaggregated_params=None,
        _postproc_params=None,
        scheduling_params=None,
        cache_salt=None,
    ):
        if self.closed:
            raise RuntimeError("LLM is shutting down")
        if not isinstance(inputs, list) or not all(isinstance(t, int) for t in inputs):
            raise TypeError("fake LLM.generate_async only takes one token-id prompt (list[int])")
        params = sampling_params or SamplingParams()
        result = RequestOutput(self._next_id, inputs, params, bool(streaming))
        self._next_id += 1
        self.async_requests.append((list(inputs), bool(streaming)))
        self._requests.put(result)
        return result

    def _execute(self):
        """The fake executor: answers each request as fake_answer says, streamed or not."""
        while (result := self._requests.get()) is not None:
            ids, reason = fake_answer(result.prompt_token_ids, result.sampling_params)
            if result._streaming:
                for k, token in enumerate(ids):
                    result._deliver(([token], k == len(ids) - 1, reason))
                if not ids:
                    result._deliver(([], True, reason))
            else:
                result._deliver((ids, True, reason))

    def generate(self, inputs, sampling_params=None, use_tqdm=True):
        """As BaseLLM.generate: generate_async(streaming=False) per prompt, then result() of each."""
        unbatched = not isinstance(inputs, list) or (inputs and isinstance(inputs[0], int))
        batch = [inputs] if unbatched else inputs
        futures = [self.generate_async(prompt, sampling_params=sampling_params, streaming=False) for prompt in batch]
        for future in futures:
            future.result()
        self.calls += 1
        return futures[0] if unbatched else futures

    def shutdown(self):
        if not self.closed:
            self.closed = True
            self._requests.put(None)
            self._executor.join()
