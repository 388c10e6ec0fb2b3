"""The reference backend: plain PyTorch + transformers, on CPU or one CUDA device.

``build`` makes the engine directory self-contained (hardlinks, or copies, of the
checkpoint's config, tokenizer and safetensors files) and reports what it found.
``load`` builds the model from ``config.json`` *without* its ``quantization_config``
and fills it with the checkpoint's weights, NVFP4 / FP8 weights dequantized to
``settings["dtype"]`` (``rackbench.engines.nvfp4``). So NVFP4 is emulated: the weights
carry exactly the values the NVFP4 checkpoint encodes; the GEMMs run in ``dtype``.

Emulation switches (``settings``):

``emulate_fp8_kv_cache`` (default true): with ``kv_cache_quant_algo: FP8`` and
    exported ``k_scale`` / ``v_scale``, every K and V entering the KV cache is rounded
    to FP8 E4M3 with that scale (what an FP8 KV cache stores).
``emulate_activation_quant`` (default false): round each quantized Linear's input as
    the real kernel would (NVFP4: per-block-of-16 E4M3 scales under the exported
    ``input_scale`` global scale; FP8: per-tensor ``input_scale``). Costs speed.

Other settings: ``dtype`` (float32 | bfloat16 | float16; default float32),
``max_batch_size`` (default 64), ``torch_threads``.

The engine implements the asynchronous Engine contract (``rackbench.engines``) with
continuous batching: one engine thread keeps a running batch of at most ``max_batch_size``
rows over a preallocated, ragged KV cache (row i holds its own positions, no left padding).
Each step admits waiting requests into free rows (prefilled in groups of similar length,
right padded; their first token comes from the prefill), takes one greedy token for every
row, completes the rows that ended (EOS or ``max_new_tokens``; the last live rows move into
their places) and decodes the rest one step (on CPU a matmul attention per band of rows).
It decodes Llama models (the model's own modules called directly: one decoding path) and
gives the same tokens as decoding each prompt alone with transformers' ``generate``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import shutil
import threading
import traceback
from pathlib import Path
from typing import Sequence

import torch

from rackbench.engines import nvfp4
from rackbench.padding import pad_batch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Files the engine needs from a checkpoint (everything else, e.g. provenance, stays behind).
_ENGINE_FILE_PATTERNS = (
    r"config\.json",
    r"generation_config\.json",
    r"hf_quant_config\.json",
    r".*\.safetensors",
    r".*\.safetensors\.index\.json",
    r"tokenizer.*",
    r"special_tokens_map\.json",
    r"added_tokens\.json",
    r"chat_template\..*",
    r".*\.model",
    r"vocab\..*",
    r"merges\.txt",
)
_QUANT_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale", "pre_quant_scale")

RECIPES = {"NVFP4": "nvfp4", "FP8": "fp8", None: "none"}


# --------------------------------------------------------------------------- build


def _link_or_copy(src: Path, dst: Path) -> str:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def read_quant_config(model_dir) -> dict:
    """The checkpoint's quantization description: quant_algo, kv_cache_quant_algo, group_size, exclude_modules.

    From ``hf_quant_config.json`` (ModelOpt), else ``config.json``'s ``quantization_config``;
    ``quant_algo`` None for an unquantized checkpoint.
    """
    model_dir = Path(model_dir)
    hf_quant = model_dir / "hf_quant_config.json"
    if hf_quant.exists():
        q = json.loads(hf_quant.read_text()).get("quantization", {})
        source = "hf_quant_config.json"
    else:
        q = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
        source = "config.json" if q else None
    algo = q.get("quant_algo")
    kv = q.get("kv_cache_quant_algo")
    if kv is None and isinstance(q.get("kv_cache_scheme"), dict):
        scheme = q["kv_cache_scheme"]
        kv = "FP8" if scheme.get("type") == "float" and scheme.get("num_bits") == 8 else None
    if algo is not None and algo not in RECIPES:
        raise ValueError(
            f"{model_dir}: quant_algo {algo!r} is not supported by the reference backend "
            f"(supported: NVFP4, FP8, unquantized)"
        )
    return {
        "quant_algo": algo,
        "kv_cache_quant_algo": kv,
        "group_size": q.get("group_size"),
        "exclude_modules": q.get("exclude_modules") or q.get("ignore"),
        "source": source,
        "recipe": RECIPES[algo],
    }


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    return files


def _scan_tensors(model_dir: Path) -> dict:
    """Count quantized layers by format, without loading the tensors."""
    from safetensors import safe_open

    counts = {"nvfp4_linear": 0, "fp8_linear": 0, "kv_scales": 0, "tensors": 0, "parameters": 0}
    for path in _safetensors_files(model_dir):
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            counts["tensors"] += len(keys)
            for key in keys:
                sl = f.get_slice(key)
                dtype, shape = sl.get_dtype(), sl.get_shape()
                if key.endswith(".weight") and f"{key}_scale" in keys:
                    if dtype == "U8":
                        counts["nvfp4_linear"] += 1
                    elif dtype.startswith("F8"):
                        counts["fp8_linear"] += 1
                if key.endswith((".k_scale", ".v_scale")):
                    counts["kv_scales"] += 1
                if not key.endswith(_QUANT_SUFFIXES):
                    n = 1
                    for s in shape:
                        n *= s
                    counts["parameters"] += n * (2 if dtype == "U8" else 1)
    return counts


def build(checkpoint_dir, engine_dir, *, gpu_type, gpu_spec, settings) -> dict:
    """Make ``engine_dir`` a self-contained copy of the checkpoint's model files; return facts."""
    checkpoint_dir, engine_dir = Path(checkpoint_dir), Path(engine_dir)
    if not (checkpoint_dir / "config.json").exists():
        raise FileNotFoundError(f"{checkpoint_dir}: no config.json (not a Hugging Face checkpoint)")
    settings = settings or {}
    dtype = settings.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"engines.reference.dtype {dtype!r} is not one of {sorted(DTYPES)}")
    engine_dir.mkdir(parents=True, exist_ok=True)
    patterns = [re.compile(p) for p in _ENGINE_FILE_PATTERNS]
    files, methods = [], set()
    for src in sorted(checkpoint_dir.iterdir()):
        if src.is_file() and any(p.fullmatch(src.name) for p in patterns):
            methods.add(_link_or_copy(src, engine_dir / src.name))
            files.append({"name": src.name, "bytes": src.stat().st_size})
    if (checkpoint_dir / "provenance.json").exists():  # keep what made the checkpoint
        shutil.copy2(checkpoint_dir / "provenance.json", engine_dir / "checkpoint_provenance.json")
    quant = read_quant_config(engine_dir)
    config = json.loads((engine_dir / "config.json").read_text())
    counts = _scan_tensors(engine_dir)
    if quant["quant_algo"] == "NVFP4" and counts["nvfp4_linear"] == 0:
        raise ValueError(f"{checkpoint_dir}: quant_algo NVFP4 but no packed NVFP4 weights found")
    if quant["quant_algo"] == "FP8" and counts["fp8_linear"] == 0:
        raise ValueError(f"{checkpoint_dir}: quant_algo FP8 but no FP8 weights found")
    return {
        "recipe_detected": quant["recipe"],
        "quant_algo": quant["quant_algo"],
        "kv_cache_quant_algo": quant["kv_cache_quant_algo"],
        "group_size": quant["group_size"],
        "exclude_modules": quant["exclude_modules"],
        "quant_config_source": quant["source"],
        "quantized_layers": counts["nvfp4_linear"] + counts["fp8_linear"],
        "nvfp4_layers": counts["nvfp4_linear"],
        "fp8_layers": counts["fp8_linear"],
        "kv_cache_scales": counts["kv_scales"],
        "parameters": counts["parameters"],
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "checkpoint_dtype": config.get("dtype", config.get("torch_dtype")),
        "compute_dtype": dtype,
        "nvfp4_emulation": "dequantized weights" if quant["quant_algo"] == "NVFP4" else None,
        "files": files,
        "file_transfer": sorted(methods),
        "checkpoint_dir": str(checkpoint_dir),
    }


# --------------------------------------------------------------------------- load


def load_state_dict(model_dir, dtype=torch.float32) -> tuple[dict, dict]:
    """The checkpoint's tensors with quantized weights dequantized to ``dtype``.

    Returns ``(state_dict, extras)``: ``extras`` maps module name -> {input_scale, k_scale,
    v_scale, format} for the emulation switches. Raises on tensors it does not understand.
    """
    from safetensors import safe_open

    raw = {}
    for path in _safetensors_files(Path(model_dir)):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                raw[key] = f.get_tensor(key)
    state, extras = {}, {}
    for key in sorted(raw):
        tensor = raw[key]
        module, _, leaf = key.rpartition(".")
        if leaf == "weight" and f"{key}_scale" in raw:
            scale = raw[f"{key}_scale"]
            if tensor.dtype == torch.uint8:
                if f"{key}_scale_2" not in raw:
                    raise ValueError(f"{key}: NVFP4 weight without weight_scale_2")
                w = nvfp4.dequantize_nvfp4(tensor, scale, raw[f"{key}_scale_2"], torch.float32)
                fmt = "nvfp4"
            elif tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                w = nvfp4.dequantize_fp8(tensor, scale, torch.float32)
                fmt = "fp8"
            else:
                raise ValueError(f"{key}: weight_scale next to a {tensor.dtype} weight")
            pqs = raw.get(f"{module}.pre_quant_scale")
            if pqs is not None:  # AWQ/SmoothQuant: y = W (x * s)  ->  fold s into W's columns
                w = w * pqs.to(torch.float32)
            state[key] = w.to(dtype)
            extras.setdefault(module, {})["format"] = fmt
        elif leaf in ("weight_scale", "weight_scale_2", "pre_quant_scale"):
            if f"{module}.weight" not in raw:
                raise ValueError(f"{key}: scale without a weight")
        elif leaf in ("input_scale", "k_scale", "v_scale"):
            extras.setdefault(module, {})[leaf] = tensor.float()
        elif tensor.dtype in (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"{key}: {tensor.dtype} tensor without scales")
        else:
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state, extras


def _model_config(model_dir: Path):
    from transformers import AutoConfig

    data = json.loads((model_dir / "config.json").read_text())
    data.pop("quantization_config", None)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def _eos_ids(model_dir: Path, config) -> list[int]:
    eos = None
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


ATTENTION = "rackbench_sdpa"
_ATTENTION_REGISTERED = False


def _register_attention() -> str:
    """Register ``rackbench_sdpa``: transformers' SDPA, except that single-token decode
    steps use two small matmuls and a softmax, which on CPU is ~3x faster than PyTorch's
    flash-attention kernel for a query length of 1. Same masks as ``sdpa``."""
    global _ATTENTION_REGISTERED
    if _ATTENTION_REGISTERED:
        return ATTENTION
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        b, hq, q_len, d = query.shape
        if q_len != 1 or query.device.type != "cpu" or dropout:
            return sdpa_attention_forward(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                is_causal=is_causal,
                **kwargs,
            )
        hkv = key.shape[1]
        scale = scaling if scaling is not None else d**-0.5
        q = query.reshape(b, hkv, hq // hkv, d)  # GQA: the query heads sharing a KV head side by side
        scores = torch.matmul(q, key.transpose(-1, -2)) * scale  # [b, hkv, groups, T]
        if attention_mask is not None:
            mask = attention_mask[..., -key.shape[-2] :]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        out = torch.matmul(probs, value)  # [b, hkv, groups, d]
        return out.reshape(b, 1, hq, d), None

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _ATTENTION_REGISTERED = True
    return ATTENTION


_LAYER_CLASS = None


def _kv_layer_class():
    """transformers' DynamicLayer that rounds what enters the cache to FP8 E4M3 with the
    exported scales (an FP8 KV cache), for the full-sequence ``ReferenceEngine.logits``.
    Built lazily: transformers is imported only when an engine loads."""
    global _LAYER_CLASS
    if _LAYER_CLASS is not None:
        return _LAYER_CLASS
    from transformers.cache_utils import DynamicLayer

    class KVLayer(DynamicLayer):
        def __init__(self, k_scale=None, v_scale=None):
            super().__init__()
            self.k_scale, self.v_scale = k_scale, v_scale

        def update(self, key_states, value_states, *args, **kwargs):
            if self.k_scale is not None:
                key_states = nvfp4.fake_quantize_fp8(key_states, self.k_scale)
                value_states = nvfp4.fake_quantize_fp8(value_states, self.v_scale)
            return super().update(key_states, value_states, *args, **kwargs)

    _LAYER_CLASS = KVLayer
    return KVLayer


class EngineClosed(RuntimeError):
    """The engine was closed before the request finished."""


class _Request:
    __slots__ = ("prompt", "max_new_tokens", "on_done", "on_error", "on_first_token", "tokens")

    def __init__(self, prompt, max_new_tokens, on_done, on_error, on_first_token):
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.on_done, self.on_error, self.on_first_token = on_done, on_error, on_first_token
        self.tokens: list[int] = []


def _call(callback, *args) -> None:
    """A caller's callback; its own failure must not stop the engine thread."""
    try:
        callback(*args)
    except BaseException:  # noqa: BLE001 - reported, then the engine goes on
        traceback.print_exc()


class ReferenceEngine:
    """Greedy decoding of a Llama model with continuous batching (see the module docstring)."""

    #: a prefill call covers prompts whose padded size stays under this many tokens, and
    #: pads no prompt by more than 1/8 of the group's longest (at least 8 tokens)
    prefill_tokens = 4096

    def __init__(self, model, *, device, eos_ids, pad_id, max_batch_size, kv_scales=None, facts=None):
        if type(model).__name__ != "LlamaForCausalLM":
            raise ValueError(f"the reference engine decodes Llama models only, not {type(model).__name__}")
        self.model = model
        self.device = device
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.max_batch_size = int(max_batch_size)
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        # the running batch holds max_batch_size rows; one more request each row waits
        # in the queue, so a finished row is refilled at once (its successor is submitted
        # from on_done, on this engine's thread, before the next step admits)
        self.max_in_flight = self.max_batch_size
        self._kv_scales = kv_scales  # (k_scales, v_scales) per layer, or None
        self._layers = model.config.num_hidden_layers
        self.facts = facts or {}
        self._kv = None  # (K, V, capacity): see _kv_storage
        self._fused_weights = None  # see _fused
        attn = model.model.layers[0].self_attn
        self._heads = (model.config.num_attention_heads, model.config.num_key_value_heads, attn.head_dim, attn.scaling)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="rackbench-reference-engine", daemon=True)
        self._thread.start()

    # ---- the Engine contract

    def submit(self, prompt: Sequence[int], max_new_tokens: int, *, on_done, on_error, on_first_token=None) -> None:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt is empty")
        request = _Request(prompt, int(max_new_tokens), on_done, on_error, on_first_token)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            self._waiting.append(request)
            self._cond.notify()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Blocking: every prompt's tokens, in order (``rackbench.engines.generate``)."""
        from rackbench.engines import generate

        return generate(self, prompts, max_new_tokens)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.model = None
        self._kv = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- the engine thread

    def _take(self, free: int, block: bool) -> list[_Request] | None:
        """Up to ``free`` waiting requests; waits for one when ``block``. None once closed."""
        with self._cond:
            while block and not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _serve(self) -> None:
        rows: list[_Request] = []
        try:
            with torch.inference_mode():
                self._decode_loop(rows)
        finally:  # closed (or a bug): nobody may wait for ever
            with self._cond:
                left = rows + list(self._waiting)
                self._waiting.clear()
            for r in left:
                _call(r.on_error, EngineClosed("the engine was closed before the request finished"))

    def _decode_loop(self, rows: list[_Request]) -> None:
        """Continuous batching: each step first admits waiting requests into free rows (their
        prefill gives their first token), then takes one greedy token for every row, completes
        the rows that finished (their places are refilled from the last rows), and decodes the
        rest one step. ``rows`` is the running batch (cache row i = rows[i])."""
        size: list[int] = []  # cache row -> positions held (prompt + fed tokens)
        logits = None  # [len(rows), vocab]: each row's next-token logits
        eos = set(self.eos_ids)
        while True:
            new = self._take(self.max_batch_size - len(rows), block=not rows)
            if new is None:
                return
            try:
                ready = []
                for r in new:
                    if r.max_new_tokens <= 0:
                        _call(r.on_done, [])
                    else:
                        ready.append(r)
                if ready:
                    first = self._admit(ready, rows, size)
                    logits = first if logits is None else torch.cat([logits, first])
                if not rows:
                    logits = None
                    continue
                tokens = logits.argmax(-1).tolist()
                finished = []
                for row, (r, tok) in enumerate(zip(rows, tokens)):
                    if tok in eos:
                        finished.append(row)
                        continue
                    r.tokens.append(tok)
                    if len(r.tokens) == 1 and r.on_first_token is not None:
                        _call(r.on_first_token, tok)
                    if len(r.tokens) >= r.max_new_tokens:
                        finished.append(row)
                if finished:
                    for row in finished:
                        _call(rows[row].on_done, rows[row].tokens)
                    self._remove_rows(finished, rows, size, tokens)
                if not rows:
                    logits = None
                    continue
                logits = self._decode_step(tokens, size)
                for i in range(len(size)):
                    size[i] += 1
            except Exception as exc:  # this batch fails; the engine goes on with the next requests
                failed = rows + [r for r in new if r not in rows and r.max_new_tokens > 0]
                rows.clear()
                size.clear()
                logits = None
                for r in failed:
                    _call(r.on_error, exc)

    def _admit(self, ready: list[_Request], rows: list[_Request], size: list[int]) -> torch.Tensor:
        """Prefill ``ready`` into the rows after the running ones (longest first, in groups of
        similar length); returns their first-token logits."""
        ready.sort(key=lambda r: -len(r.prompt))
        K, V = self._kv_storage(max(len(r.prompt) + r.max_new_tokens for r in ready), len(rows))
        row0 = len(rows)
        lengths = [len(r.prompt) for r in ready]
        parts = [
            self._prefill_llama([ready[i].prompt for i in grp], K, V, row0 + grp[0])
            for grp in self._prefill_groups(lengths)
        ]
        rows.extend(ready)
        size.extend(lengths)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _remove_rows(self, finished: list[int], rows: list, size: list[int], tokens: list[int]) -> None:
        """Finished rows leave the batch: the last live rows move into their places (only
        their KV is copied), so no step computes a finished row."""
        b = len(rows) - len(finished)
        gone = set(finished)
        holes = [r for r in finished if r < b]
        movers = [r for r in range(b, len(rows)) if r not in gone]
        if holes:
            K, V, _ = self._kv
            dst, src = torch.tensor(holes, device=self.device), torch.tensor(movers, device=self.device)
            used = max(size[r] for r in movers)
            for buf in K + V:
                buf[dst, :, :used] = buf[src, :, :used]
            for h, m in zip(holes, movers):
                rows[h], size[h], tokens[h] = rows[m], size[m], tokens[m]
        del rows[b:], size[b:], tokens[b:]

    def _prefill_groups(self, lengths: list[int]) -> list[list[int]]:
        """Consecutive runs of the (longest-first) prompts that are prefilled together."""
        groups, current = [], []
        for i, n in enumerate(lengths):
            if current:
                longest = lengths[current[0]]
                if (len(current) + 1) * longest > self.prefill_tokens or longest - n > max(8, longest // 8):
                    groups.append(current)
                    current = []
            current.append(i)
        if current:
            groups.append(current)
        return groups

    # ---- the model's own modules called directly, one ragged batch

    def _fused(self):
        """Per layer: (q|k|v weight, gate|up weight) concatenated along the output dim, so each
        decode step runs 2 GEMMs where the modules run 5 (each output column is the same dot
        product, so the results are the same). None where a Linear has a bias or a forward
        hook (activation-quant emulation): then the modules are called."""
        if self._fused_weights is None:
            fused = []
            for layer in self.model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                mods = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
                if any(m.bias is not None or m._forward_pre_hooks or m._forward_hooks for m in mods):
                    fused = []
                    break
                fused.append(
                    (
                        torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                        torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    )
                )
            self._fused_weights = fused
        return self._fused_weights or None

    def _qkv(self, li: int, layer, x: torch.Tensor):
        """Projections of ``x`` [..., hidden]: (q|k [..., (hq + hkv) * d], v [..., hkv * d])."""
        fused = self._fused()
        attn = layer.self_attn
        if fused is None:
            return torch.cat([attn.q_proj(x), attn.k_proj(x)], dim=-1), attn.v_proj(x)
        hq, hkv, d, _ = self._heads
        qkv = torch.nn.functional.linear(x, fused[li][0])
        return qkv[..., : (hq + hkv) * d], qkv[..., (hq + hkv) * d :]

    def _mlp(self, li: int, layer, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused()
        mlp = layer.mlp
        if fused is None:
            return mlp(x)
        gu = torch.nn.functional.linear(x, fused[li][1])
        inter = gu.shape[-1] // 2
        return mlp.down_proj(mlp.act_fn(gu[..., :inter]) * gu[..., inter:])

    def _kv_storage(self, capacity: int, keep_rows: int) -> tuple[list, list]:
        """Per-layer K and V storage [max_batch_size, kv heads, capacity, head dim], kept between
        requests (a fresh multi-MB tensor per batch costs page faults on CPU). Grown (the first
        ``keep_rows`` rows copied over) when a request needs more positions. Zeroed when
        allocated, afterwards only ever holding K/V values this engine computed, so the
        masked positions a decode step reads are finite."""
        if self._kv is not None and self._kv[2] >= capacity:
            return self._kv[0], self._kv[1]
        hq, hkv, d, _ = self._heads
        body = self.model.model
        dtype = body.embed_tokens.weight.dtype
        old = self._kv
        capacity = -(-max(capacity, old[2] * 5 // 4 if old else 0) // 64) * 64  # grow rarely
        new = tuple(
            [torch.zeros((self.max_batch_size, hkv, capacity, d), dtype=dtype, device=self.device) for _ in body.layers]
            for _ in range(2)
        )
        if old is not None and keep_rows:
            for dst, src in zip(new[0] + new[1], old[0] + old[1]):
                dst[:keep_rows, :, : old[2]] = src[:keep_rows]
        self._kv = (new[0], new[1], capacity)
        return new

    @staticmethod
    def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """transformers' ``apply_rotary_pos_emb`` for one tensor: x*cos + rotate_half(x)*sin."""
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def _prefill_llama(self, prompts: list[list[int]], K: list, V: list, row0: int) -> torch.Tensor:
        """Right-padded prefill of prompts of similar length (longest first) into cache rows
        ``row0..``, positions ``0..len-1`` (what lies beyond a prompt's length is never
        attended to). The last layer runs its query, attention output and MLP for each
        prompt's last token only: only its K and V are needed for the other tokens.
        Returns the last tokens' logits."""
        body, dev = self.model.model, self.device
        g, width = len(prompts), len(prompts[0])
        hq, hkv, d, scale = self._heads
        ids, _ = pad_batch(prompts, self.pad_id, side="right", device=dev)
        last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
        rows = torch.arange(g, device=dev)
        pos = torch.arange(width, device=dev).unsqueeze(0).expand(g, width)
        h = body.embed_tokens(ids)
        cos, sin = body.rotary_emb(h, pos)  # [g, width, d]
        cos4, sin4 = cos.unsqueeze(2), sin.unsqueeze(2)  # [g, width, 1, d]: over heads
        ks, vs = self._kv_scales or (None, None)
        n_layers = len(body.layers)
        for li, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            final = li == n_layers - 1
            if final:  # the query of each prompt's last token only
                fused = self._fused()
                if fused is None:
                    k, v = attn.k_proj(x), attn.v_proj(x)
                else:
                    kv = torch.nn.functional.linear(x, fused[li][0][hq * d :])
                    k, v = kv[..., : hkv * d], kv[..., hkv * d :]
                q = (
                    attn.q_proj(x[rows, last])
                    if fused is None
                    else torch.nn.functional.linear(x[rows, last], fused[li][0][: hq * d])
                )
                q = self._rotary(q.view(g, hq, 1, d), cos[rows, last][:, None, None], sin[rows, last][:, None, None])
                k = self._rotary(k.view(g, width, hkv, d), cos4, sin4).transpose(1, 2)
            else:
                qk, v = self._qkv(li, layer, x)
                qk = self._rotary(qk.view(g, width, hq + hkv, d), cos4, sin4)
                q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2)
            v = v.reshape(g, width, hkv, d).transpose(1, 2)
            if ks is not None:
                k, v = nvfp4.fake_quantize_fp8(k, ks[li]), nvfp4.fake_quantize_fp8(v, vs[li])
            K[li][row0 : row0 + g, :, :width] = k
            V[li][row0 : row0 + g, :, :width] = v
            if not final:
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=hq != hkv
                )
                h = h + attn.o_proj(o.transpose(1, 2).reshape(g, width, hq * d))
                h = h + self._mlp(li, layer, layer.post_attention_layernorm(h))
            else:
                mask = (torch.arange(width, device=dev).unsqueeze(0) <= last.unsqueeze(1))[:, None, None, :]
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=scale, enable_gqa=hq != hkv
                )
                h = h[rows, last] + attn.o_proj(o.reshape(g, hq * d))
                h = h + self._mlp(li, layer, layer.post_attention_layernorm(h))
        return self.model.lm_head(body.norm(h))

    def _decode_step(self, tokens: list[int], size: list[int]) -> torch.Tensor:
        """One step for every running row: row i's token ``tokens[i]`` goes to position
        ``size[i]`` (a ragged KV cache: row i holds its own positions 0..size[i], no left
        padding). Decode attention is two matmuls and a softmax under a per-row length mask,
        in up to 4 bands of rows, each over its own longest row. Returns the next logits."""
        body, dev = self.model.model, self.device
        hq, hkv, d, scale = self._heads
        g = hq // hkv
        b = len(tokens)
        K, V = [k[:b] for k in self._kv[0]], [v[:b] for v in self._kv[1]]
        ks, vs = self._kv_scales or (None, None)
        # a power-of-two softmax scale is applied to the query (exact) instead of the scores
        scale_q = float(scale) if scale > 0 and math.frexp(scale)[0] == 0.5 else None
        pos = torch.tensor(size, device=dev)  # where each row's token goes
        span = max(size) + 1
        chunk = max(8, -(-b // 4))
        bands = [(r, min(r + chunk, b), max(size[r : r + chunk]) + 1) for r in range(0, b, chunk)]
        rows = torch.arange(b, device=dev)
        bias = torch.zeros((b, span), dtype=torch.float32, device=dev)
        bias.masked_fill_(torch.arange(span, device=dev).unsqueeze(0) > pos.unsqueeze(1), float("-inf"))
        bias = bias[:, None, None, :]
        h = body.embed_tokens(torch.tensor(tokens, device=dev))
        cos, sin = body.rotary_emb(h, pos.unsqueeze(1))  # [b, 1, d]: over heads
        for li, layer in enumerate(body.layers):
            x = layer.input_layernorm(h)
            qk, v = self._qkv(li, layer, x)
            qk = self._rotary(qk.view(b, hq + hkv, d), cos, sin)
            q, k, v = qk[:, :hq].view(b, hkv, g, d), qk[:, hq:], v.reshape(b, hkv, d)
            if ks is not None:
                k, v = nvfp4.fake_quantize_fp8(k, ks[li]), nvfp4.fake_quantize_fp8(v, vs[li])
            K[li][rows, :, pos] = k
            V[li][rows, :, pos] = v
            if scale_q is not None:
                q = q * scale_q
            o = q.new_empty(q.shape) if len(bands) > 1 else None
            for r0, r1, width in bands:
                scores = torch.matmul(q[r0:r1], K[li][r0:r1, :, :width].transpose(-1, -2))
                if scale_q is None:
                    scores = scores * scale
                mask = bias[r0:r1, ..., :width]
                scores = scores.add_(mask) if scores.dtype == mask.dtype else scores + mask
                probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
                if o is None:
                    o = torch.matmul(probs, V[li][r0:r1, :, :width])
                else:
                    torch.matmul(probs, V[li][r0:r1, :, :width], out=o[r0:r1])
            h = h + layer.self_attn.o_proj(o.reshape(b, hq * d))
            h = h + self._mlp(li, layer, layer.post_attention_layernorm(h))
        return self.model.lm_head(body.norm(h))

    @torch.inference_mode()
    def logits(self, prompt: Sequence[int]) -> torch.Tensor:
        """Full-sequence logits of one prompt (float32, CPU) through the model's own forward
        (FP8-KV rounding as in the cache): for accuracy checks."""
        from transformers.cache_utils import Cache

        layer = _kv_layer_class()
        ks, vs = self._kv_scales or ([None] * self._layers, [None] * self._layers)
        cache = Cache(layers=[layer(ks[i], vs[i]) for i in range(self._layers)])
        ids = torch.tensor([list(prompt)], device=self.device)
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].float().cpu()


def _add_activation_quant(model, extras) -> int:
    """Round quantized Linears' inputs as the NVFP4/FP8 GEMM would; returns the number of hooks."""
    hooks = 0
    for name, module in model.named_modules():
        info = extras.get(name)
        if not info or "input_scale" not in info or not isinstance(module, torch.nn.Linear):
            continue
        scale = info["input_scale"].to(module.weight.device)
        if info.get("format") == "nvfp4":

            def hook(mod, args, scale=scale):
                return (nvfp4.fake_quantize_nvfp4(args[0], scale),) + args[1:]
        else:

            def hook(mod, args, scale=scale):
                return (nvfp4.fake_quantize_fp8(args[0], scale),) + args[1:]

        module.register_forward_pre_hook(hook)
        hooks += 1
    return hooks


def _kv_scales(model, extras, num_layers):
    """Per-layer (k_scales, v_scales) from ``...layers.N.self_attn[.k_proj].k_scale``."""
    k, v = [None] * num_layers, [None] * num_layers
    for name, info in extras.items():
        m = re.search(r"layers\.(\d+)\.", name)
        if not m:
            continue
        layer = int(m.group(1))
        if "k_scale" in info:
            k[layer] = info["k_scale"]
        if "v_scale" in info:
            v[layer] = info["v_scale"]
    if all(s is None for s in k + v):
        return None
    missing = [i for i in range(num_layers) if k[i] is None or v[i] is None]
    if missing:
        raise ValueError(f"k_scale/v_scale missing for layers {missing}")
    return k, v


def load(engine_dir, *, record, gpu_ids, settings) -> ReferenceEngine:
    """One engine per GPU: a shard with several GPUs runs one replica on each,
    behind its one LoadGen (rackbench.engines.replicas)."""
    if gpu_ids is not None and len(gpu_ids) > 1:
        from rackbench.engines.replicas import ReplicaPool

        return ReplicaPool(__name__, engine_dir, record=record, settings=settings, gpu_ids=gpu_ids, gpus_per_replica=1)
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    engine_dir = Path(engine_dir)
    settings = dict(settings or {})
    if settings.get("torch_threads"):
        torch.set_num_threads(int(settings["torch_threads"]))
    dtype = DTYPES[settings.get("dtype", "float32")]
    if gpu_ids and torch.cuda.is_available():
        device = torch.device("cuda", int(gpu_ids[0]))
    else:
        device = torch.device("cpu")
    config = _model_config(engine_dir)
    quant = read_quant_config(engine_dir)
    state, extras = load_state_dict(engine_dir, dtype)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=_register_attention())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise ValueError(
            f"{engine_dir}: checkpoint does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}"
        )
    model.to(device).eval()
    kv = None
    if settings.get("emulate_fp8_kv_cache", True) and quant["kv_cache_quant_algo"] == "FP8":
        kv = _kv_scales(model, extras, config.num_hidden_layers)
        if kv is not None:
            kv = ([s.to(device) for s in kv[0]], [s.to(device) for s in kv[1]])
    hooks = _add_activation_quant(model, extras) if settings.get("emulate_activation_quant", False) else 0
    eos = _eos_ids(engine_dir, config)
    pad = getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    facts = {
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "recipe": quant["recipe"],
        "fp8_kv_cache_emulated": kv is not None,
        "activation_quant_hooks": hooks,
        "eos_token_ids": eos,
    }
    return ReferenceEngine(
        model,
        device=device,
        eos_ids=eos,
        pad_id=pad,
        max_batch_size=settings.get("max_batch_size", 64),
        kv_scales=kv,
        facts=facts,
    )
