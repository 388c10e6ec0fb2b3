"""TensorRT-LLM backend (written against TensorRT-LLM 1.2.x).

Two modes, chosen by ``settings["mode"]``:

``pytorch`` (TensorRT-LLM's default LLM-API backend)
    ``build`` writes ``extra_llm_api_options.yaml`` (the LLM-API arguments:
    max_batch_size, max_num_tokens, max_seq_len, kv_cache_config with an FP8
    cache and free_gpu_memory_fraction, chunked prefill, scheduler policy) and,
    on the GPU node, does a warm-up load of the NVFP4 checkpoint with those
    arguments, recording what it ran on. ``load`` runs ``tensorrt_llm.LLM``.

``tensorrt`` (TensorRT engine)
    ``build`` exports a TensorRT-LLM checkpoint with ModelOpt's
    ``export_tensorrt_llm_checkpoint`` for the chosen tp x pp, then runs
    ``trtllm-build`` with the MLPerf record's flags. ``load`` runs the engine
    directory through ``tensorrt_llm._tensorrt_engine.LLM`` and refuses it on a
    GPU of another compute capability or under another TensorRT-LLM version.

One replica = tp x pp GPUs. A shard that owns more GPUs gets a
:class:`rackbench.engines.replicas.ReplicaPool` of replicas.

Every flag and LLM-API field emitted here is checked against the TensorRT-LLM
1.2.1 facts in ``rackbench/contracts/trtllm_1_2.yaml``: at config time by
``rackbench.trtllm_options`` (before any job) and by tests/test_tensorrt_llm_backend.py.
On a Slurm GPU node every process that creates an ``LLM`` is started through
``trtllm-llmapi-launch`` (``rackbench.trtllm_launch``).
This module never imports ``tensorrt_llm`` at import time.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from rackbench.config import schema_defaults
from rackbench.trtllm_options import choices

MODES = ("pytorch", "tensorrt")
EXTRA_OPTIONS_FILE = "extra_llm_api_options.yaml"
WARMUP_FILE = "warmup.json"
TRT_CHECKPOINT_SUBDIR = "trtllm_checkpoint"
TRT_ENGINE_SUBDIR = "engine"
LLAMA2_EOS_ID = 2  # Llama-2 tokenizer </s>; MLPerf generation_config eos_token_id

# The allowed values come from the contract data (llm_args.py SchedulerConfig enums).
SCHEDULER_POLICIES = choices("scheduler_config.capacity_scheduler_policy")
CHUNKING_POLICIES = choices("scheduler_config.context_chunking_policy")
# LLM-API objects passed through as given when the settings name them (null included:
# ``cuda_graph_config: null`` turns TensorRT-LLM's decode CUDA graphs off, as NVIDIA's
# v6.0 GB300 llama2-70b configs do with use_graphs False); absent = TensorRT-LLM's default.
PASSTHROUGH_LLM_API_OBJECTS = ("cuda_graph_config", "torch_compile_config")

# The defaults live in the config schema (engines.tensorrt-llm; they reproduce the
# NVIDIA v5.1 code Azure shipped, closed/Azure/configs/ND_GB200_v6/Offline/llama2-70b.py).
DEFAULTS: dict[str, Any] = schema_defaults("engines", "tensorrt-llm")


class EngineMismatch(RuntimeError):
    """An engine directory used on a GPU type or TensorRT-LLM version it was not built for."""


# --------------------------------------------------------------------------- settings


def resolve_settings(settings: dict | None) -> dict:
    """Defaults filled in and checked; raises ValueError naming the bad key."""
    merged = copy.deepcopy(DEFAULTS)
    for key, value in (settings or {}).items():
        if key == "kv_cache" and isinstance(value, dict):
            merged["kv_cache"].update(value)
        else:
            merged[key] = value
    s = merged
    if s["mode"] not in MODES:
        raise ValueError(f"tensorrt-llm mode {s['mode']!r} is not one of {MODES}")
    for key in (
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "max_batch_size",
        "max_num_tokens",
        "max_input_len",
        "max_seq_len",
        "tokens_per_block",
    ):
        if not isinstance(s[key], int) or s[key] < 1:
            raise ValueError(f"tensorrt-llm {key} must be a positive integer, got {s[key]!r}")
    if s["max_input_len"] >= s["max_seq_len"]:
        raise ValueError(f"max_input_len {s['max_input_len']} must be < max_seq_len {s['max_seq_len']}")
    if s["runtime_max_num_tokens"] is not None and s["runtime_max_num_tokens"] > s["max_num_tokens"]:
        raise ValueError("runtime_max_num_tokens cannot exceed max_num_tokens")
    if s["kv_cache"]["dtype"] not in ("auto", "fp8"):
        raise ValueError(f"kv_cache.dtype must be auto or fp8, got {s['kv_cache']['dtype']!r}")
    frac = s["kv_cache"]["free_gpu_memory_fraction"]
    if not 0.0 < float(frac) <= 1.0:
        raise ValueError(f"kv_cache.free_gpu_memory_fraction must be in (0, 1], got {frac!r}")
    if s["scheduler_policy"] not in SCHEDULER_POLICIES:
        raise ValueError(f"scheduler_policy {s['scheduler_policy']!r} not in {SCHEDULER_POLICIES}")
    if s["context_chunking_policy"] is not None and s["context_chunking_policy"] not in CHUNKING_POLICIES:
        raise ValueError(f"context_chunking_policy {s['context_chunking_policy']!r} not in {CHUNKING_POLICIES}")
    if not isinstance(s["trtllm_build_extra_flags"], dict):
        raise ValueError("trtllm_build_extra_flags must be a mapping flag -> value")
    for key in PASSTHROUGH_LLM_API_OBJECTS:
        if key in s and s[key] is not None and not isinstance(s[key], dict):
            raise ValueError(f"{key} must be a mapping or null, got {s[key]!r}")
    return s


def replica_size(settings: dict) -> int:
    s = resolve_settings(settings)
    return s["tensor_parallel_size"] * s["pipeline_parallel_size"]


# --------------------------------------------------------------------------- pytorch mode


def llm_api_options(settings: dict) -> dict:
    """The LLM-API arguments written as ``extra_llm_api_options.yaml``.

    Keys are ``TorchLlmArgs`` fields (tensorrt_llm/llmapi/llm_args.py); the
    shape follows NVIDIA's v5.1 harness (code/llmlib/config.py
    ``_generate_extra_config_yaml``).
    """
    s = resolve_settings(settings)
    scheduler = {"capacity_scheduler_policy": s["scheduler_policy"]}
    if s["context_chunking_policy"] is not None:
        scheduler["context_chunking_policy"] = s["context_chunking_policy"]
    return {
        "tensor_parallel_size": s["tensor_parallel_size"],
        "pipeline_parallel_size": s["pipeline_parallel_size"],
        "max_batch_size": s["max_batch_size"],
        "max_num_tokens": s["runtime_max_num_tokens"] or s["max_num_tokens"],
        "max_input_len": s["max_input_len"],
        "max_seq_len": s["max_seq_len"],
        "enable_chunked_prefill": bool(s["enable_chunked_prefill"]),
        "kv_cache_config": {
            "dtype": s["kv_cache"]["dtype"],
            "free_gpu_memory_fraction": float(s["kv_cache"]["free_gpu_memory_fraction"]),
            "enable_block_reuse": bool(s["kv_cache"]["enable_block_reuse"]),
        },
        "scheduler_config": scheduler,
        **{key: copy.deepcopy(s[key]) for key in PASSTHROUGH_LLM_API_OBJECTS if key in s},
    }


def write_llm_api_options(path: str | os.PathLike, settings: dict) -> dict:
    options = llm_api_options(settings)
    Path(path).write_text(
        "# TensorRT-LLM LLM-API arguments (TorchLlmArgs), written by rackbench.engines.tensorrt_llm.\n"
        "# Usable as trtllm-serve/trtllm-bench --extra_llm_api_options.\n" + yaml.safe_dump(options, sort_keys=True)
    )
    return options


def read_llm_api_options(path: str | os.PathLike) -> dict:
    return yaml.safe_load(Path(path).read_text())


# --------------------------------------------------------------------------- tensorrt mode


def trtllm_build_flags(settings: dict) -> dict[str, Any]:
    """flag -> value for ``trtllm-build`` (without checkpoint/output dirs).

    The record's flags (closed/Azure/configs/ND_GB200_v6/Offline/llama2-70b.py
    ``trtllm_build_flags``) plus ``--gemm_plugin nvfp4`` asked for by the issue.
    """
    s = resolve_settings(settings)
    flags: dict[str, Any] = {
        "gemm_plugin": "nvfp4",
        "use_paged_context_fmha": "enable",
        "use_fp8_context_fmha": "enable",
        "kv_cache_type": "paged",
        "tokens_per_block": s["tokens_per_block"],
        "max_batch_size": s["max_batch_size"],
        "max_num_tokens": s["max_num_tokens"],
        "max_input_len": s["max_input_len"],
        "max_seq_len": s["max_seq_len"],
        "max_beam_width": 1,
        "multiple_profiles": "enable",
        "use_fused_mlp": "enable",
        "norm_quant_fusion": "enable",
        "remove_input_padding": "enable",
        "context_fmha": "enable",
    }
    world = s["tensor_parallel_size"] * s["pipeline_parallel_size"]
    if world > 1:
        flags["workers"] = world
    flags.update(s["trtllm_build_extra_flags"])
    return flags


def trtllm_build_command(checkpoint_dir, output_dir, settings: dict) -> list[str]:
    cmd = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir)]
    for flag, value in trtllm_build_flags(settings).items():
        cmd += [f"--{flag}", str(value)]
    return cmd


def export_trtllm_checkpoint(checkpoint_dir, out_dir, settings: dict) -> None:  # pragma: no cover - GPU node
    """ModelOpt ``export_tensorrt_llm_checkpoint`` for the chosen tp x pp.

    ``export_tensorrt_llm_checkpoint`` needs the ModelOpt-quantized torch
    module, not the exported HF files: the base model is loaded from
    ``settings["base_model_dir"]`` and its quantizer state restored from
    ``<checkpoint_dir>/modelopt_state.pth`` (written by the quantize step:
    ``rackbench.quantize.save_modelopt_state``).
    """
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from transformers import AutoModelForCausalLM

    from rackbench.quantize import restore_modelopt_state

    s = resolve_settings(settings)
    base = s.get("base_model_dir")
    state = Path(checkpoint_dir) / "modelopt_state.pth"
    if not base or not state.is_file():
        raise FileNotFoundError(
            f"tensorrt mode needs settings['base_model_dir'] and {state} (ModelOpt state saved by the quantize step)"
        )
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float16, device_map="cuda")
    model = restore_modelopt_state(model, state)
    with torch.inference_mode():
        export_tensorrt_llm_checkpoint(
            model,
            decoder_type="llama",
            dtype=torch.float16,
            export_dir=str(out_dir),
            inference_tensor_parallel=s["tensor_parallel_size"],
            inference_pipeline_parallel=s["pipeline_parallel_size"],
        )


# --------------------------------------------------------------------------- hardware facts


def gpu_facts() -> dict:  # pragma: no cover - needs a GPU
    import torch

    if not torch.cuda.is_available():
        return {"name": None, "compute_capability": None, "count": 0}
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "name": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
        "count": torch.cuda.device_count(),
    }


def trtllm_version() -> str | None:
    try:
        import tensorrt_llm
    except ImportError:
        return None
    return getattr(tensorrt_llm, "__version__", None)


def check_runtime(facts: dict, *, gpu: dict, version: str | None) -> None:
    """Refuse an engine on another compute capability or TensorRT-LLM version."""
    problems = []
    want_cc = facts.get("compute_capability")
    if want_cc is not None and gpu.get("compute_capability") != want_cc:
        problems.append(
            f"compute capability {gpu.get('compute_capability')} != built for {want_cc} ({facts.get('gpu_type')})"
        )
    want_ver = facts.get("tensorrt_llm_version")
    if want_ver is not None and version != want_ver:
        problems.append(f"TensorRT-LLM {version} != built with {want_ver}")
    if problems:
        raise EngineMismatch("; ".join(problems))


# --------------------------------------------------------------------------- build


def build(
    checkpoint_dir,
    engine_dir,
    *,
    gpu_type: str,
    gpu_spec: dict,
    settings: dict,
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    export: Callable[[Any, Any, dict], None] | None = None,
    gpu: Callable[[], dict] = gpu_facts,
) -> dict:
    """Populate ``engine_dir`` for ``gpu_type``; return the backend facts.

    Runs on a GPU node of ``gpu_type`` inside the TensorRT-LLM container.
    ``run``/``export``/``gpu`` are injectable for tests.
    """
    s = resolve_settings(settings)
    checkpoint_dir, engine_dir = Path(checkpoint_dir).resolve(), Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    want_cc = gpu_spec.get("compute_capability")
    here = gpu()
    if want_cc is not None and here.get("compute_capability") not in (None, str(want_cc)):
        raise EngineMismatch(
            f"building for {gpu_type} (compute capability {want_cc}) on "
            f"{here.get('name')} (compute capability {here.get('compute_capability')})"
        )
    facts: dict[str, Any] = {
        "mode": s["mode"],
        "gpu_type": gpu_type,
        "compute_capability": None if want_cc is None else str(want_cc),
        "tensorrt_llm_version": trtllm_version(),
        "tensor_parallel_size": s["tensor_parallel_size"],
        "pipeline_parallel_size": s["pipeline_parallel_size"],
        "max_batch_size": s["max_batch_size"],
        "end_id": s["end_id"],
        "model_dir": str(checkpoint_dir),
        "built_on": here,
    }
    if s["mode"] == "pytorch":
        facts["extra_llm_api_options"] = write_llm_api_options(engine_dir / EXTRA_OPTIONS_FILE, s)
        if s["warmup"]:
            facts["warmup"] = _warmup(checkpoint_dir, engine_dir, s, gpu_type=gpu_type, gpu=here)
        return facts

    trt_ckpt = engine_dir / TRT_CHECKPOINT_SUBDIR
    out = engine_dir / TRT_ENGINE_SUBDIR
    (export or export_trtllm_checkpoint)(checkpoint_dir, trt_ckpt, s)
    cmd = trtllm_build_command(trt_ckpt, out, s)
    started = time.time()
    proc = run(cmd, capture_output=True, text=True)
    (engine_dir / "trtllm-build.log").write_text(
        "$ " + " ".join(cmd) + "\n" + (proc.stdout or "") + (proc.stderr or "")
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"trtllm-build failed with exit code {proc.returncode}; see {engine_dir / 'trtllm-build.log'}"
        )
    shutil.rmtree(trt_ckpt, ignore_errors=True)  # the engine holds the weights
    facts.update(
        {
            "trtllm_build_command": cmd,
            "trtllm_build_seconds": round(time.time() - started, 1),
            "engine_subdir": TRT_ENGINE_SUBDIR,
            "model_dir": None,
        }
    )
    return facts


def _warmup(checkpoint_dir: Path, engine_dir: Path, s: dict, *, gpu_type: str, gpu: dict) -> dict:
    """Load the checkpoint with the written options and decode a few tokens."""
    started = time.time()
    engine = _open_llm(str(checkpoint_dir), s, mode="pytorch")
    loaded = time.time()
    ids = engine.generate([[1, 15043, 29892, 590, 1024, 338]], 8)
    engine.close()
    record = {
        "gpu_type": gpu_type,
        "gpu": gpu,
        "tensorrt_llm_version": trtllm_version(),
        "load_seconds": round(loaded - started, 1),
        "generated_tokens": len(ids[0]),
        "host": os.uname().nodename,
        "finished_at": time.time(),
    }
    (engine_dir / WARMUP_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


# --------------------------------------------------------------------------- load / run


class TrtllmEngine:
    """One LLM-API instance (one replica) driven in-process, on the Engine contract.

    ``submit`` schedules one coroutine per request on an asyncio event loop that runs in
    this engine's own thread. The coroutine calls ``LLM.generate_async`` there: a
    GenerationResult has its asyncio queue only when it is created inside a running event
    loop (tensorrt_llm/executor/result.py, ``has_event_loop()``), and the LLM API offers no
    completion callback. With ``on_first_token`` the request is streamed (``streaming=True``,
    ``async for`` over the result: the first chunk's ``outputs[0].token_ids[0]`` is the first
    token); otherwise it is not (``await result.aresult()``), as NVIDIA's harness streams only
    Server and Interactive. TensorRT-LLM's in-flight batching decides what runs together.
    """

    def __init__(self, llm, sampling_params_cls, *, max_batch_size: int, end_id: int):
        self.llm = llm
        self._sampling_params_cls = sampling_params_cls
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_batch_size
        self.end_id = end_id
        self._tasks: set = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rackbench-trtllm-loop", daemon=True)
        self._thread.start()

    def sampling_params(self, max_new_tokens: int):
        # Greedy (top_k=1), token ids only, Llama-2 </s> as end id.
        return self._sampling_params_cls(
            max_tokens=int(max_new_tokens), end_id=self.end_id, pad_id=self.end_id, top_k=1, detokenize=False
        )

    def answer(self, token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """The contract's tokens: generated ids before the end id, at most ``max_new_tokens``."""
        ids = [int(t) for t in token_ids]
        if self.end_id in ids:
            ids = ids[: ids.index(self.end_id)]
        return ids[:max_new_tokens]

    def submit(self, prompt: Sequence[int], max_new_tokens: int, *, on_done, on_error, on_first_token=None) -> None:
        if self.llm is None:
            raise RuntimeError("the TensorRT-LLM engine is closed")
        request = self._request([int(t) for t in prompt], int(max_new_tokens), on_done, on_error, on_first_token)
        asyncio.run_coroutine_threadsafe(request, self._loop)

    async def _request(self, prompt, max_new_tokens, on_done, on_error, on_first_token) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            result = self.llm.generate_async(
                prompt, sampling_params=self.sampling_params(max_new_tokens), streaming=on_first_token is not None
            )
            if on_first_token is None:
                await result.aresult()
            else:
                reported = False
                async for partial in result:
                    ids = partial.outputs[0].token_ids
                    if not reported and ids:
                        reported = True
                        if int(ids[0]) != self.end_id and max_new_tokens > 0:  # an answer of 0 tokens has none
                            _call(on_first_token, int(ids[0]))
            tokens = self.answer(result.outputs[0].token_ids, max_new_tokens)
        except asyncio.CancelledError:
            _call(on_error, RuntimeError("the TensorRT-LLM engine was closed before the request finished"))
            return
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine goes on
            _call(on_error, exc)
            return
        finally:
            self._tasks.discard(task)
        _call(on_done, tokens)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Blocking: every prompt's tokens, in order (``rackbench.engines.generate``)."""
        from rackbench.engines import generate

        return generate(self, prompts, max_new_tokens)

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(timeout=60)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=60)
            self._loop.close()
        if llm is not None:
            llm.shutdown()


def _call(callback, *args) -> None:
    """A caller's callback; its failure must not stop the engine's event loop."""
    try:
        callback(*args)
    except BaseException:  # noqa: BLE001 - reported, then the engine goes on
        traceback.print_exc()


def _open_llm(model: str, s: dict, *, mode: str, options: dict | None = None) -> TrtllmEngine:
    from tensorrt_llm import SamplingParams

    if mode == "pytorch":
        from tensorrt_llm import LLM

        options = options if options is not None else llm_api_options(s)
        llm = LLM(model=model, skip_tokenizer_init=True, **options)
        return TrtllmEngine(llm, SamplingParams, max_batch_size=int(options["max_batch_size"]), end_id=s["end_id"])
    else:
        from tensorrt_llm._tensorrt_engine import LLM as TrtLLM

        llm = TrtLLM(
            model=model,
            skip_tokenizer_init=True,
            max_batch_size=s["max_batch_size"],
            max_num_tokens=s["runtime_max_num_tokens"] or s["max_num_tokens"],
            enable_chunked_prefill=bool(s["enable_chunked_prefill"]),
            kv_cache_config={
                "free_gpu_memory_fraction": float(s["kv_cache"]["free_gpu_memory_fraction"]),
                "enable_block_reuse": bool(s["kv_cache"]["enable_block_reuse"]),
            },
            scheduler_config=llm_api_options(s)["scheduler_config"],
        )
    return TrtllmEngine(llm, SamplingParams, max_batch_size=s["max_batch_size"], end_id=s["end_id"])


def load_replica(engine_dir, *, record: dict, settings: dict) -> TrtllmEngine:
    """One replica on the GPUs this process sees (CUDA_VISIBLE_DEVICES already set)."""
    facts = record.get("backend_facts", record)
    s = resolve_settings({**(settings or {}), "mode": facts.get("mode", (settings or {}).get("mode", "pytorch"))})
    if facts.get("mode") == "tensorrt":
        check_runtime(facts, gpu=gpu_facts(), version=trtllm_version())
        return _open_llm(str(Path(engine_dir) / facts.get("engine_subdir", TRT_ENGINE_SUBDIR)), s, mode="tensorrt")
    # The options the build wrote (and warmed up with) are the runtime: no drift.
    options = read_llm_api_options(Path(engine_dir) / EXTRA_OPTIONS_FILE)
    return _open_llm(facts["model_dir"], s, mode="pytorch", options=options)


def load(engine_dir, *, record: dict, gpu_ids: Sequence[int], settings: dict):
    """One engine for a shard owning ``gpu_ids``: a replica, or a pool of them."""
    facts = record.get("backend_facts", record)
    size = int(facts.get("tensor_parallel_size", 1)) * int(facts.get("pipeline_parallel_size", 1))
    gpu_ids = list(gpu_ids)
    if not gpu_ids:
        raise ValueError("the tensorrt-llm backend needs GPUs; this shard owns none")
    if len(gpu_ids) % size:
        raise ValueError(f"{len(gpu_ids)} GPUs do not divide into replicas of tp*pp={size}")
    if len(gpu_ids) == size and settings.get("in_process", True):
        return load_replica(engine_dir, record=record, settings=settings)
    from rackbench.engines.replicas import ReplicaPool

    return ReplicaPool(
        __name__,
        engine_dir,
        record=record,
        settings=settings,
        gpu_ids=gpu_ids,
        gpus_per_replica=size,
        loader="load_replica",
    )
