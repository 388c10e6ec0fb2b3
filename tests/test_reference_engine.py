"""The reference backend on real ModelOpt checkpoints of a tiny random Llama.

``tiny_checkpoints`` quantizes one tiny model three ways with ModelOpt (NVFP4 + FP8 KV,
FP8 + FP8 KV, none) and exports each with ``export_hf_checkpoint``; it also keeps the
ModelOpt fake-quant models (NVFP4 through a CPU quant backend registered here) so the
engine's logits can be compared with ModelOpt's own.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from rackbench import demo
from rackbench.engines import reference

VOCAB = 256
CPU_BACKEND = "rackbench_test_cpu_nvfp4"


def _register_cpu_nvfp4_backend():
    """ModelOpt's NVFP4 fake quant needs CUDA; on CPU route it through NVFP4QTensor."""
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import (
        is_registered_quant_backend,
        register_quant_backend,
    )
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    def nvfp4_cpu(x, quantizer):
        global_scale = quantizer.amax.float() / (6.0 * 448.0)
        qt, scale, scale_2 = NVFP4QTensor.quantize(
            x.detach().float().clone(), 16, weights_scaling_factor_2=global_scale
        )
        return qt.dequantize(dtype=x.dtype, scale=scale, double_scale=scale_2, block_sizes={-1: 16})

    if not is_registered_quant_backend(CPU_BACKEND):
        register_quant_backend(CPU_BACKEND, nvfp4_cpu)


def tiny_model(seed=0, hidden=64, layers=2, heads=4, kv_heads=2, inter=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        architectures=["LlamaForCausalLM"],
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def quantize_and_export(model, recipe: str, out: Path):
    """ModelOpt PTQ (max calibration) + export; returns the fake-quant model, its quantizer
    amaxes set to what the export used (the export shares q/k/v and gate/up global scales)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import TensorQuantizer

    base = {"nvfp4": mtq.NVFP4_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[recipe]
    cfg = copy.deepcopy(base)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(mtq.FP8_KV_CFG)["quant_cfg"]
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(3, VOCAB, (4, 32), generator=gen)
    model = mtq.quantize(model, cfg, lambda m: m(calib))
    exported = copy.deepcopy(model)  # export packs the weights in place
    export_hf_checkpoint(exported, export_dir=str(out))
    exported_q = dict(exported.named_modules())
    for name, mod in model.named_modules():
        if isinstance(mod, TensorQuantizer) and getattr(mod, "_amax", None) is not None:
            other = getattr(exported_q.get(name), "_amax", None)
            if other is not None and other.shape == mod._amax.shape:
                mod.amax = other.clone()
            if recipe == "nvfp4" and mod.is_enabled and name.endswith(("weight_quantizer", "input_quantizer")):
                mod.backend = CPU_BACKEND
    return model


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    _register_cpu_nvfp4_backend()
    root = tmp_path_factory.mktemp("ckpt")
    base = tiny_model()
    out = {"root": root, "base": base}
    for recipe in ("nvfp4", "fp8"):
        out[f"{recipe}_fq"] = quantize_and_export(copy.deepcopy(base), recipe, root / recipe)
    copy.deepcopy(base).save_pretrained(root / "none")  # (save_pretrained leaves config.dtype a str)
    for recipe in ("none", "nvfp4", "fp8"):
        out[recipe] = root / recipe
        reference.build(root / recipe, root / f"engine-{recipe}", gpu_type="cpu", gpu_spec={}, settings={})
        out[f"engine-{recipe}"] = root / f"engine-{recipe}"
    return out


def prompts(n=14, seed=0, lo=2, hi=40):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def hf_greedy(model, prompts, max_new_tokens, eos):
    """Each prompt alone through transformers' own generate: the unbatched reference."""
    return demo.greedy(model, prompts, max_new_tokens, batch_size=1, eos=eos)


# --------------------------------------------------------------------------- build


def test_build_is_self_contained_and_reports_facts(tiny_checkpoints, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["nvfp4"], ckpt)
    (ckpt / "provenance.json").write_text('{"step": "quantize"}')
    facts = reference.build(ckpt, tmp_path / "engine", gpu_type="cpu", gpu_spec={}, settings={})
    assert facts["recipe_detected"] == "nvfp4" and facts["quant_algo"] == "NVFP4"
    assert facts["kv_cache_quant_algo"] == "FP8" and facts["group_size"] == 16
    assert facts["quantized_layers"] == facts["nvfp4_layers"] == 2 * 7  # q k v o gate up down per layer
    assert facts["kv_cache_scales"] == 2 * 2
    assert (tmp_path / "engine" / "checkpoint_provenance.json").exists()
    assert not (tmp_path / "engine" / "provenance.json").exists()
    shutil.rmtree(ckpt)  # the engine must not need the checkpoint any more
    engine = reference.load(tmp_path / "engine", record={}, gpu_ids=[], settings={"torch_threads": 1})
    assert engine.facts["recipe"] == "nvfp4" and engine.facts["fp8_kv_cache_emulated"]
    assert len(engine.generate([[1, 5, 6]], 4)[0]) == 4

    fp8 = reference.build(tiny_checkpoints["fp8"], tmp_path / "e8", gpu_type="cpu", gpu_spec={}, settings={})
    assert fp8["recipe_detected"] == "fp8" and fp8["fp8_layers"] == 14 and fp8["nvfp4_layers"] == 0
    none = reference.build(tiny_checkpoints["none"], tmp_path / "e0", gpu_type="cpu", gpu_spec={}, settings={})
    assert none["recipe_detected"] == "none" and none["quantized_layers"] == 0


def test_build_rejects_bad_dtype(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        reference.build(
            tiny_checkpoints["none"], tmp_path / "e", gpu_type="cpu", gpu_spec={}, settings={"dtype": "int3"}
        )


# --------------------------------------------------------------------------- numerics


def test_unquantized_engine_equals_transformers(tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    engine = reference.load(tiny_checkpoints["engine-none"], record={}, gpu_ids=[], settings={})
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["none"], dtype=torch.float32).eval()
    ids = prompts(1, seed=3)[0]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(engine.logits(ids), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe", ["nvfp4", "fp8"])
def test_engine_logits_match_modelopt_fake_quant(tiny_checkpoints, recipe):
    """With activation and KV-cache emulation on, the dequantizing engine computes what
    ModelOpt's fake-quant model computes; with weights only, it is still much closer to
    the fake-quant model's weights-only forward than to the unquantized model."""
    import modelopt.torch.quantization as mtq

    fq_full = tiny_checkpoints[f"{recipe}_fq"]
    base = tiny_checkpoints["base"]
    ids = torch.tensor([prompts(1, seed=5, lo=30, hi=31)[0]])
    with torch.no_grad():
        want_full = fq_full(ids).logits[0]
        unquantized = base(ids).logits[0]
    fq_weights = copy.deepcopy(fq_full)
    mtq.disable_quantizer(fq_weights, "*input_quantizer")
    mtq.disable_quantizer(fq_weights, "*bmm_quantizer")
    with torch.no_grad():
        want_weights = fq_weights(ids).logits[0]

    full = reference.load(
        tiny_checkpoints[f"engine-{recipe}"],
        record={},
        gpu_ids=[],
        settings={"emulate_activation_quant": True, "emulate_fp8_kv_cache": True},
    )
    assert full.facts["activation_quant_hooks"] == 14 and full.facts["fp8_kv_cache_emulated"]
    got_full = full.logits(ids[0].tolist())
    weights = reference.load(
        tiny_checkpoints[f"engine-{recipe}"], record={}, gpu_ids=[], settings={"emulate_fp8_kv_cache": False}
    )
    got_weights = weights.logits(ids[0].tolist())

    quant_effect = (want_full - unquantized).abs().max().item()
    assert quant_effect > 1e-3  # quantization visibly changes the logits...
    assert (got_full - want_full).abs().max().item() < 1e-4  # ...and the engine reproduces it
    assert (got_weights - want_weights).abs().max().item() < 1e-4
    assert (got_weights - unquantized).abs().max().item() > 10 * (got_weights - want_weights).abs().max().item()


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("recipe", ["nvfp4", "none"])
def test_batched_generate_equals_unbatched(tiny_checkpoints, recipe):
    ps = prompts(14, seed=11)
    engine = reference.load(
        tiny_checkpoints[f"engine-{recipe}"],
        record={},
        gpu_ids=[],
        settings={"max_batch_size": 4, "emulate_fp8_kv_cache": False},
    )
    got = engine.generate(ps, 20)
    assert len(got) == len(ps) and all(0 < len(g) <= 20 for g in got)
    want = hf_greedy(engine.model, ps, 20, eos=2)
    assert got == want
    # with FP8 KV emulation (no transformers counterpart): batched == one prompt at a time
    kv = reference.load(tiny_checkpoints[f"engine-{recipe}"], record={}, gpu_ids=[], settings={"max_batch_size": 5})
    assert kv.generate(ps, 12) == [kv.generate([p], 12)[0] for p in ps]


def test_eos_stops_each_sequence(tiny_checkpoints, tmp_path):
    """Make a frequently generated token the EOS: sequences stop at different steps, the
    EOS itself is not returned, and each matches transformers' unbatched generate."""
    engine_dir = tmp_path / "engine"
    shutil.copytree(tiny_checkpoints["engine-nvfp4"], engine_dir)
    ps = prompts(16, seed=21)
    gen = json.loads((engine_dir / "generation_config.json").read_text())
    (engine_dir / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": []}))
    free = reference.load(engine_dir, record={}, gpu_ids=[], settings={"emulate_fp8_kv_cache": False})
    assert free.eos_ids == []
    runs = free.generate(ps, 24)
    assert all(len(r) == 24 for r in runs)  # no EOS: every sequence runs to max_new_tokens
    counts = {}
    for r in runs:
        for pos, tok in enumerate(r):
            if pos > 0:  # prefer tokens that end sequences early but not at once
                counts[tok] = counts.get(tok, 0) + 1
    eos = max(counts, key=counts.get)
    (engine_dir / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))

    engine = reference.load(
        engine_dir, record={}, gpu_ids=[], settings={"emulate_fp8_kv_cache": False, "max_batch_size": 6}
    )
    assert engine.eos_ids == [eos]
    got = engine.generate(ps, 24)
    assert all(eos not in g for g in got)
    lengths = {len(g) for g in got}
    assert len(lengths) > 1 and min(lengths) < 24  # some stopped early, not all at the same step
    for g, r in zip(got, runs):  # a stopped sequence is the prefix before the first EOS
        assert g == (r[: r.index(eos)] if eos in r else r)
    assert got == hf_greedy(engine.model, ps, 24, eos=eos)


def test_generate_edge_cases(tiny_checkpoints):
    engine = reference.load(tiny_checkpoints["engine-none"], record={}, gpu_ids=[], settings={"max_batch_size": 2})
    assert engine.max_batch_size == 2
    assert engine.generate([[1, 4], [1, 5, 6]], 0) == [[], []]
    one = engine.generate([[1, 4], [1, 5, 6], [7]], 1)
    assert [len(o) for o in one] == [1, 1, 1]
    assert engine.generate([], 5) == []
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1], []], 3)
    engine.close()


def test_shard_with_several_gpus_runs_one_replica_per_gpu(tiny_checkpoints):
    """A 2-GPU shard gets a pool of two reference replicas (CPU here; one GPU each on
    CUDA nodes) whose outputs equal a single engine's, in order."""
    from rackbench.engines.replicas import ReplicaPool

    settings = {"max_batch_size": 4, "torch_threads": 1}
    ps = prompts(10, seed=5)
    single = reference.load(tiny_checkpoints["engine-nvfp4"], record={}, gpu_ids=[], settings=settings)
    pool = reference.load(tiny_checkpoints["engine-nvfp4"], record={}, gpu_ids=[0, 1], settings=settings)
    try:
        assert isinstance(pool, ReplicaPool) and pool.num_replicas == 2
        assert pool.max_batch_size == 8
        assert pool.generate(ps, 12) == single.generate(ps, 12)
    finally:
        pool.close()


def test_pad_batch_left_and_right():
    from rackbench.padding import pad_batch

    ids, mask = pad_batch([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], 9, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")


def test_continuous_batching_admits_requests_while_others_decode(tiny_checkpoints):
    """Requests submitted one after another, while earlier ones are still decoding, join the
    running batch; each still gets exactly its unbatched greedy answer, its first token
    (reported before it is done) is that answer's first, and max_new_tokens is per request."""
    import threading

    engine = reference.load(
        tiny_checkpoints["engine-nvfp4"],
        record={},
        gpu_ids=[],
        settings={"max_batch_size": 3, "emulate_fp8_kv_cache": False},
    )
    try:
        ps = prompts(9, seed=31)
        limits = [6 + 3 * (i % 4) for i in range(len(ps))]
        events, finished = [], threading.Semaphore(0)
        for i, (p, n) in enumerate(zip(ps, limits)):
            engine.submit(
                p,
                n,
                on_done=lambda t, i=i: (events.append(("done", i, t)), finished.release()),
                on_error=lambda e, i=i: (events.append(("error", i, e)), finished.release()),
                on_first_token=lambda tok, i=i: events.append(("first", i, tok)),
            )
        for _ in ps:
            finished.acquire()
        done = {e[1]: e[2] for e in events if e[0] == "done"}
        assert sorted(done) == list(range(len(ps)))
        for i, (p, n) in enumerate(zip(ps, limits)):
            assert done[i] == hf_greedy(engine.model, [p], n, eos=2)[0]
            firsts = [e for e in events if e[0] == "first" and e[1] == i]
            if done[i]:
                assert firsts == [("first", i, done[i][0])]
                assert events.index(firsts[0]) < events.index(("done", i, done[i]))
        # 9 requests through 3 rows: a later request (not among the first 3 admitted) joined
        # while an earlier one was still decoding, i.e. not in waves
        at = {(e[0], e[1]): k for k, e in enumerate(events)}
        assert any(at.get(("first", j), 1e9) < at[("done", i)] for j in range(3, len(ps)) for i in range(j))
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1, 2], 3, on_done=print, on_error=print)
