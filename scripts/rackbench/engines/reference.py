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

``Engine.generate`` decodes greedily in batches of at most ``max_batch_size``
(prompts sorted by length and prefilled in groups of similar length, left padding +
attention mask, a preallocated KV cache, finished sequences dropped from the batch,
and on CPU a matmul attention for the one-token decode steps), and gives the same
tokens as decoding each prompt alone with transformers' ``generate``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch

from rackbench.engines import nvfp4

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}

# Files the engine needs from a checkpoint (everything else, e.g. provenance, stays behind).
_ENGINE_FILE_PATTERNS = (
    r"config\.json", r"generation_config\.json", r"hf_quant_config\.json",
    r".*\.safetensors", r".*\.safetensors\.index\.json",
    r"tokenizer.*", r"special_tokens_map\.json", r"added_tokens\.json", r"chat_template\..*",
    r".*\.model", r"vocab\..*", r"merges\.txt",
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
        raise ValueError(f"{model_dir}: quant_algo {algo!r} is not supported by the reference backend "
                         f"(supported: NVFP4, FP8, unquantized)")
    return {"quant_algo": algo, "kv_cache_quant_algo": kv, "group_size": q.get("group_size"),
            "exclude_modules": q.get("exclude_modules") or q.get("ignore"), "source": source,
            "recipe": RECIPES[algo]}


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
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        hkv = key.shape[1]
        scale = scaling if scaling is not None else d ** -0.5
        q = query.reshape(b, hkv, hq // hkv, d)  # GQA: the query heads sharing a KV head side by side
        scores = torch.matmul(q, key.transpose(-1, -2)) * scale  # [b, hkv, groups, T]
        if attention_mask is not None:
            mask = attention_mask[..., -key.shape[-2]:]
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
    """A KV-cache layer with preallocated storage (no torch.cat per step) that optionally
    rounds what enters it to FP8 E4M3 (an FP8 KV cache). Built lazily: transformers is
    imported only when an engine loads."""
    global _LAYER_CLASS
    if _LAYER_CLASS is not None:
        return _LAYER_CLASS
    from transformers.cache_utils import DynamicLayer

    class KVLayer(DynamicLayer):
        def __init__(self, k_scale=None, v_scale=None, reserve: int = 0):
            super().__init__()
            self.k_scale, self.v_scale, self.reserve = k_scale, v_scale, reserve
            self.length = 0
            self._k = self._v = None

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def _allocate(self, batch, heads, capacity, head_dim, value_dim):
            self._k = torch.zeros((batch, heads, capacity, head_dim), dtype=self.dtype, device=self.device)
            self._v = torch.zeros((batch, heads, capacity, value_dim), dtype=self.dtype, device=self.device)

        def _expose(self):
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if self.k_scale is not None:
                key_states = nvfp4.fake_quantize_fp8(key_states, self.k_scale)
                value_states = nvfp4.fake_quantize_fp8(value_states, self.v_scale)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            b, h, t, d = key_states.shape
            if self._k is None:
                self._allocate(b, h, t + self.reserve, d, value_states.shape[-1])
            elif self.length + t > self._k.shape[2]:  # grow (not on the engine's own path)
                grow = max(t, self._k.shape[2])
                self._k = torch.cat([self._k, self._k.new_zeros((*self._k.shape[:2], grow, d))], dim=2)
                self._v = torch.cat([self._v, self._v.new_zeros((*self._v.shape[:2], grow, self._v.shape[-1]))], dim=2)
            self._k[:, :, self.length:self.length + t] = key_states
            self._v[:, :, self.length:self.length + t] = value_states
            self.length += t
            self._expose()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices):
            if self._k is not None:
                self._k, self._v = self._k[indices], self._v[indices]
                self._expose()

        def install(self, parts, rows, width, capacity):
            """Fill a fresh layer from prefilled group layers: ``parts[i]`` (keys/values of
            prompts left-padded to their group's width) go to batch rows ``rows[i]``,
            right-aligned at ``width``; room for ``capacity - width`` more positions."""
            first = parts[0]
            self.dtype, self.device, self.is_initialized = first.dtype, first.device, True
            batch = sum(len(r) for r in rows)
            self._allocate(batch, first._k.shape[1], capacity, first._k.shape[-1], first._v.shape[-1])
            for part, idx in zip(parts, rows):
                n = part.length
                self._k[idx, :, width - n:width] = part._k[:, :, :n]
                self._v[idx, :, width - n:width] = part._v[:, :, :n]
            self.length = width
            self._expose()

    _LAYER_CLASS = KVLayer
    return KVLayer


class ReferenceEngine:
    """Greedy batched decoding of a transformers causal LM (see the module docstring)."""

    #: a prefill call covers prompts whose padded size stays under this many tokens, and
    #: pads no prompt by more than 1/8 of the group's longest (at least 8 tokens)
    prefill_tokens = 4096

    def __init__(self, model, *, device, eos_ids, pad_id, max_batch_size, kv_scales=None, facts=None):
        self.model = model
        self.device = device
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.max_batch_size = int(max_batch_size)
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._kv_scales = kv_scales  # (k_scales, v_scales) per layer, or None
        self._layers = model.config.num_hidden_layers
        self.facts = facts or {}
        self._eos = torch.tensor(self.eos_ids or [-1], device=device)
        self._llama = type(model).__name__ == "LlamaForCausalLM"  # the hand-written decode loop below
        self._kv_buf = None
        self._fused_weights = None  # see _fused
        if self._llama:
            attn = model.model.layers[0].self_attn
            self._heads = (model.config.num_attention_heads, model.config.num_key_value_heads,
                           attn.head_dim, attn.scaling)

    def _new_cache(self, reserve: int = 0):
        from transformers.cache_utils import Cache
        layer = _kv_layer_class()
        ks, vs = self._kv_scales or ([None] * self._layers, [None] * self._layers)
        return Cache(layers=[layer(ks[i], vs[i], reserve) for i in range(self._layers)])

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        prompts = [list(map(int, p)) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
        out: list[list[int] | None] = [None] * len(prompts)
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        batch_fn = self._generate_batch_llama if self._llama else self._generate_batch
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            for i, ids in zip(chunk, batch_fn([prompts[i] for i in chunk], max_new_tokens)):
                out[i] = ids
        return out

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

    def _prefill(self, prompts: list[list[int]]):
        """Left-padded forward of prompts of similar length; returns (last logits, cache)."""
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self.model(input_ids=ids, attention_mask=mask if width > min(map(len, prompts)) else None,
                            position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1, :], cache

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        # prompts arrive longest first
        n, width = len(prompts), len(prompts[0])
        lengths = [len(p) for p in prompts]
        groups = self._prefill_groups(lengths)
        parts, logits = [], []
        for group in groups:
            group_logits, group_cache = self._prefill([prompts[i] for i in group])
            logits.append(group_logits)
            parts.append(group_cache)
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        cache = self._new_cache()
        rows = [torch.tensor(g, device=self.device) for g in groups]
        for layer_idx, layer in enumerate(cache.layers):
            layer.install([p.layers[layer_idx] for p in parts], rows, width, width + max_new_tokens)
        del parts
        lengths_t = torch.tensor(lengths, device=self.device)
        mask = (torch.arange(width, device=self.device).unsqueeze(0) >= (width - lengths_t).unsqueeze(1)).long()
        next_pos = lengths_t.unsqueeze(1)  # position of the first generated token
        alive = torch.arange(n, device=self.device)  # original rows still decoding
        generated = [[] for _ in range(n)]
        for step in range(max_new_tokens):
            tokens = logits.argmax(-1)
            done = torch.isin(tokens, self._eos)
            for row, tok, d in zip(alive.tolist(), tokens.tolist(), done.tolist()):
                if not d:
                    generated[row].append(tok)
            if step == max_new_tokens - 1:
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                alive, tokens, mask, next_pos = alive[keep], tokens[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            logits = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=mask, position_ids=next_pos,
                                past_key_values=cache, use_cache=True).logits[:, -1, :]
            next_pos = next_pos + 1
        return generated

    # ---- the Llama path: the model's own modules called directly, one ragged batch

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
                fused.append((torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                              torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])))
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
        return qkv[..., :(hq + hkv) * d], qkv[..., (hq + hkv) * d:]

    def _mlp(self, li: int, layer, x: torch.Tensor) -> torch.Tensor:
        fused = self._fused()
        mlp = layer.mlp
        if fused is None:
            return mlp(x)
        gu = torch.nn.functional.linear(x, fused[li][1])
        inter = gu.shape[-1] // 2
        return mlp.down_proj(mlp.act_fn(gu[..., :inter]) * gu[..., inter:])

    def _kv_buffers(self, rows: int, capacity: int) -> tuple[list, list]:
        """Per-layer K and V storage [rows, kv heads, capacity, head dim], kept between
        calls (a fresh multi-MB tensor per batch costs page faults on CPU). Zeroed when
        allocated, afterwards only ever holding K/V values this engine computed, so the
        masked positions a decode step reads are finite."""
        hq, hkv, d, _ = self._heads
        body = self.model.model
        dtype = body.embed_tokens.weight.dtype
        buf = self._kv_buf
        if buf is None or buf[0][0].shape[0] < rows or buf[0][0].shape[2] < capacity:
            size = (rows, capacity) if buf is None else \
                (max(rows, buf[0][0].shape[0]), max(capacity, buf[0][0].shape[2]))
            self._kv_buf = buf = None  # free the old storage before the new is allocated
            buf = tuple([torch.zeros((size[0], hkv, size[1], d), dtype=dtype, device=self.device)
                         for _ in body.layers] for _ in range(2))
            self._kv_buf = buf
        return [k[:rows, :, :capacity] for k in buf[0]], [v[:rows, :, :capacity] for v in buf[1]]

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
        ids = torch.full((g, width), self.pad_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, :len(p)] = torch.tensor(p)
        ids = ids.to(dev)
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
                    kv = torch.nn.functional.linear(x, fused[li][0][hq * d:])
                    k, v = kv[..., :hkv * d], kv[..., hkv * d:]
                q = attn.q_proj(x[rows, last]) if fused is None else \
                    torch.nn.functional.linear(x[rows, last], fused[li][0][:hq * d])
                q = self._rotary(q.view(g, hq, 1, d), cos[rows, last][:, None, None], sin[rows, last][:, None, None])
                k = self._rotary(k.view(g, width, hkv, d), cos4, sin4).transpose(1, 2)
            else:
                qk, v = self._qkv(li, layer, x)
                qk = self._rotary(qk.view(g, width, hq + hkv, d), cos4, sin4)
                q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2)
            v = v.reshape(g, width, hkv, d).transpose(1, 2)
            if ks is not None:
                k, v = nvfp4.fake_quantize_fp8(k, ks[li]), nvfp4.fake_quantize_fp8(v, vs[li])
            K[li][row0:row0 + g, :, :width] = k
            V[li][row0:row0 + g, :, :width] = v
            if not final:
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                     enable_gqa=hq != hkv)
                h = h + attn.o_proj(o.transpose(1, 2).reshape(g, width, hq * d))
                h = h + self._mlp(li, layer, layer.post_attention_layernorm(h))
            else:
                mask = (torch.arange(width, device=dev).unsqueeze(0) <= last.unsqueeze(1))[:, None, None, :]
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                     enable_gqa=hq != hkv)
                h = h[rows, last] + attn.o_proj(o.reshape(g, hq * d))
                h = h + self._mlp(li, layer, layer.post_attention_layernorm(h))
        return self.model.lm_head(body.norm(h))

    @torch.inference_mode()
    def _generate_batch_llama(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy decoding of one batch (prompts longest first) with a ragged KV cache: row i
        holds its own positions 0..len_i+step, so no left padding; decode attention is two
        matmuls and a softmax under a per-row length mask, in up to 4 bands of rows, each
        over its own longest row. A finished row leaves the batch at once: the last live
        rows move into the finished rows' places (only their KV is copied), so no step
        computes a finished row."""
        body, dev = self.model.model, self.device
        hq, hkv, d, scale = self._heads
        g = hq // hkv
        n, lengths = len(prompts), [len(p) for p in prompts]
        capacity = lengths[0] + max_new_tokens
        K, V = self._kv_buffers(n, capacity)
        groups = self._prefill_groups(lengths)
        logits = [self._prefill_llama(prompts[grp[0]:grp[-1] + 1], K, V, grp[0]) for grp in groups]
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        ks, vs = self._kv_scales or (None, None)
        # a power-of-two softmax scale is applied to the query (exact) instead of the scores
        scale_q = float(scale) if scale > 0 and math.frexp(scale)[0] == 0.5 else None
        eos = set(self.eos_ids)
        orig = list(range(n))            # cache row -> prompt
        size = list(lengths)             # cache row -> positions held (prompt + generated so far)
        pos = torch.tensor(lengths, device=dev)  # where each row's next token goes
        positions = torch.arange(capacity, device=dev)
        generated = [[] for _ in range(n)]
        for step in range(max_new_tokens):
            tokens = logits.argmax(-1)
            done = []
            for row, tok in enumerate(tokens.tolist()):
                if tok in eos:
                    done.append(row)
                else:
                    generated[orig[row]].append(tok)
            if step == max_new_tokens - 1:
                break
            b = len(orig)
            if done:
                b -= len(done)
                if b == 0:
                    break
                holes = [r for r in done if r < b]
                gone = set(done)
                movers = [r for r in range(b, len(orig)) if r not in gone]
                if holes:  # the last live rows fill the finished rows' places
                    dst, src = torch.tensor(holes, device=dev), torch.tensor(movers, device=dev)
                    used = max(size[r] for r in movers)
                    for buf in K + V:
                        buf[dst, :, :used] = buf[src, :, :used]
                    for h_, m_ in zip(holes, movers):
                        orig[h_], size[h_] = orig[m_], size[m_]
                    perm = torch.arange(len(orig), device=dev)
                    perm[dst] = src
                    perm = perm[:b]
                    tokens, pos = tokens[perm], pos[perm]
                else:
                    tokens, pos = tokens[:b], pos[:b]
                del orig[b:], size[b:]
                K, V = [k[:b] for k in K], [v[:b] for v in V]
            span = max(size) + 1
            # attend in up to 4 bands of rows (rows are mostly longest first), each band over
            # its own longest row
            chunk = max(8, -(-b // 4))
            bands = [(r, min(r + chunk, b), max(size[r:r + chunk]) + 1) for r in range(0, b, chunk)]
            rows = torch.arange(b, device=dev)
            bias = torch.zeros((b, span), dtype=torch.float32, device=dev)
            bias.masked_fill_(positions[:span].unsqueeze(0) > pos.unsqueeze(1), float("-inf"))
            bias = bias[:, None, None, :]
            h = body.embed_tokens(tokens)
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
            logits = self.model.lm_head(body.norm(h))
            pos = pos + 1
            size = [s + 1 for s in size]
        return generated

    @torch.inference_mode()
    def logits(self, prompt: Sequence[int]) -> torch.Tensor:
        """Full-sequence logits of one prompt (float32, CPU): for accuracy checks."""
        ids = torch.tensor([list(prompt)], device=self.device)
        return self.model(input_ids=ids, past_key_values=self._new_cache(), use_cache=True).logits[0].float().cpu()

    def close(self) -> None:
        self.model = None
        self._kv_buf = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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

        return ReplicaPool(__name__, engine_dir, record=record, settings=settings, gpu_ids=gpu_ids,
                           gpus_per_replica=1)
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
        raise ValueError(f"{engine_dir}: checkpoint does not fit {type(model).__name__}: "
                         f"missing {missing}, unexpected {unexpected}")
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
    facts = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "recipe": quant["recipe"],
             "fp8_kv_cache_emulated": kv is not None, "activation_quant_hooks": hooks, "eos_token_ids": eos}
    return ReferenceEngine(model, device=device, eos_ids=eos, pad_id=pad,
                           max_batch_size=settings.get("max_batch_size", 64), kv_scales=kv, facts=facts)
