"""Output tokens/s of the reference engine's batched greedy decoding vs a naive loop.

Builds the demo-sized tiny Llama (2 layers, hidden 256, vocab 1024; config.yaml's
``demo.model``) with random weights, quantizes it with ModelOpt (NVFP4 + FP8 KV) and
exports it, builds a reference engine from the export, then decodes the same prompts

1. with ``Engine.generate`` (batches of ``--batch-size``), for each emulation setting;
2. naively: ``model.generate`` once per prompt on the engine's own (dequantized) model.

and prints output tokens/s for each (fastest of ``--repeats`` runs: the machine may be
shared) and the ratio (target >= 5x), and checks that the
engine's tokens equal the naive loop's (no FP8-KV emulation in that comparison, as
transformers' generate has none).

    python bench/reference_engine.py [--samples 48] [--max-new-tokens 64] [--batch-size 64] [--threads 1] [--repeats 3]
        [--hidden 256 --intermediate 688 --vocab 1024]
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

import torch


def make_checkpoint(out: Path, *, hidden, inter, layers, heads, vocab, seed=0) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=2048, architectures=["LlamaForCausalLM"],
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    qcfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    qcfg["quant_cfg"] = list(qcfg["quant_cfg"]) + copy.deepcopy(mtq.FP8_KV_CFG)["quant_cfg"]
    calib = torch.randint(3, vocab, (4, 64))
    model = mtq.quantize(model, qcfg, lambda m: m(calib))
    export_hf_checkpoint(model, export_dir=str(out))


def naive(model, prompts, max_new_tokens, eos):
    outs = []
    with torch.inference_mode():
        for p in prompts:
            g = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
            ids = g[0, len(p):].tolist()
            outs.append(ids[:ids.index(eos)] if eos in ids else ids)
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--min-prompt", type=int, default=20)
    ap.add_argument("--max-prompt", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest counts")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    args = ap.parse_args()

    from rackbench.engines import reference
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, args.vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt) - 1)]
               for _ in range(args.samples)]
    with tempfile.TemporaryDirectory(prefix="rb-bench-") as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "ckpt", hidden=args.hidden, inter=args.intermediate, layers=args.layers,
                        heads=args.heads, vocab=args.vocab)
        reference.build(tmp / "ckpt", tmp / "engine", gpu_type="cpu", gpu_spec={}, settings={})
        print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, NVFP4 + FP8 KV; "
              f"{args.samples} prompts of {args.min_prompt}..{args.max_prompt} tokens, "
              f"max_new_tokens {args.max_new_tokens}, {args.threads} thread(s)")
        results = {}
        variants = {
            "engine (weights only)": {"emulate_fp8_kv_cache": False},
            "engine (+FP8 KV, default)": {},
            "engine (+FP8 KV +activations)": {"emulate_activation_quant": True},
        }
        for label, extra in variants.items():
            engine = reference.load(tmp / "engine", record={}, gpu_ids=[],
                                    settings={"max_batch_size": args.batch_size, "torch_threads": args.threads,
                                              **extra})
            engine.generate(prompts[:2], 2)  # warm up
            dt = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = engine.generate(prompts, args.max_new_tokens)
                dt = min(dt, time.perf_counter() - t0)
            results[label] = (out, sum(map(len, out)) / dt, dt)
            if label == "engine (weights only)":
                model, eos = engine.model, engine.eos_ids[0]
        naive(model, prompts[:1], 2, eos)  # warm up
        dt = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref_out = naive(model, prompts, args.max_new_tokens, eos)
            dt = min(dt, time.perf_counter() - t0)
        naive_tps = sum(map(len, ref_out)) / dt
        print(f"{'naive model.generate per sample':34s} {sum(map(len, ref_out)):6d} tokens {dt:7.2f} s "
              f"{naive_tps:9.1f} tok/s")
        for label, (out, tps, secs) in results.items():
            print(f"{label:34s} {sum(map(len, out)):6d} tokens {secs:7.2f} s {tps:9.1f} tok/s  "
                  f"x{tps / naive_tps:5.1f} vs naive")
        same = results["engine (weights only)"][0] == ref_out
        print(f"engine (weights only) tokens == naive loop tokens: {same}")
        if not same:
            raise SystemExit("batched output differs from the per-sample loop")


if __name__ == "__main__":
    main()
