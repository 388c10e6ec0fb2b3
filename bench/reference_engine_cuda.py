"""Benchmark 6: the reference engine on CUDA with a Llama-2-7B-shaped model in bf16.

Builds a ``LlamaForCausalLM`` with Llama-2-7B's shape (hidden 4096, 32 layers, 32 heads,
32 KV heads, intermediate 11008, vocab 32000) and random bf16 weights directly on the
GPU (no download, no checkpoint), wraps it in ``rackbench.engines.reference.ReferenceEngine``
and decodes greedily at batch sizes 1, 2, 4, ..., 256 (``--prompt-len`` random prompt
tokens, ``--new-tokens`` new tokens, no EOS so every sequence runs to the end).

For each batch size it prints output tokens/s, the decode-step time (from a run with
one new token, whose time is the prefill, subtracted) and the fraction of the
memory-bandwidth roofline: bytes a decode step must read (all weights once + the KV
cache of every sequence at its mean length) / step time, over the GPU's peak HBM
bandwidth, looked up from the device name (``--peak-tbps`` overrides it).

    python bench/reference_engine_cuda.py [--batch-sizes 1,2,4,...,256] [--prompt-len 128]
        [--new-tokens 128] [--peak-tbps 3.35]

Needs an NVIDIA GPU with ~16 GB free plus the KV cache (batch 256 x 256 positions:
~34 GB); exits with an error message without CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

# Peak HBM bandwidth (TB/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_TBPS = [
    ("GB300", 8.0),
    ("B300", 8.0),
    ("GB200", 8.0),
    ("B200", 8.0),
    ("H200", 4.8),
    ("GH200", 4.0),
    ("H100 NVL", 3.9),
    ("H100 PCIe", 2.0),
    ("H100", 3.35),  # H100 SXM / HBM3
    ("H800", 3.35),
    ("H20", 4.0),
    ("A100-SXM4-80GB", 2.039),
    ("A100 80GB PCIe", 1.935),
    ("A100", 1.555),
    ("L40S", 0.864),
    ("L40", 0.864),
    ("L4", 0.3),
    ("A10G", 0.6),
    ("A10", 0.6),
    ("RTX 6000 Ada", 0.96),
    ("V100", 0.9),
    ("T4", 0.32),
]

SHAPE = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)


def peak_tbps(name: str) -> float | None:
    for key, tbps in PEAK_TBPS:
        if key.lower() in name.lower():
            return tbps
    return None


def build_engine(max_batch_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    from rackbench.engines.reference import ReferenceEngine, _register_attention

    cfg = LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    device = torch.device("cuda", 0)
    with torch.device(device), no_init_weights():
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation=_register_attention())
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.eval()
    # no EOS: every sequence decodes all new tokens
    return ReferenceEngine(model, device=device, eos_ids=[], pad_id=0, max_batch_size=max_batch_size), cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default=",".join(str(2**i) for i in range(9)))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per batch size; the fastest counts")
    ap.add_argument("--peak-tbps", type=float, help="override the peak HBM bandwidth lookup (TB/s)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench/reference_engine_cuda.py needs an NVIDIA GPU with CUDA: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Not run.",
            file=sys.stderr,
        )
        return 2
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    name = torch.cuda.get_device_name(0)
    props = torch.cuda.get_device_properties(0)
    peak = args.peak_tbps or peak_tbps(name)
    print(
        f"GPU: {name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
        f"compute capability {props.major}.{props.minor}); peak HBM bandwidth "
        f"{f'{peak} TB/s' if peak else 'unknown (pass --peak-tbps)'}; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}"
    )
    engine, cfg = build_engine(max(batch_sizes))
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    # a decode step reads every weight once; the embedding table only at the rows it looks up
    weight_bytes -= engine.model.model.embed_tokens.weight.numel() * 2
    kv_bytes_per_pos = (
        2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    )
    print(
        f"model: Llama-2-7B shape, random bf16 weights, {weight_bytes / 1e9:.2f} GB read per decode step "
        f"(+ KV cache {kv_bytes_per_pos / 1e6:.3f} MB per position per sequence); prompts of "
        f"{args.prompt_len} tokens, {args.new_tokens} new tokens"
    )
    gen = torch.Generator().manual_seed(0)
    print(f"{'batch':>5} {'tokens/s':>10} {'step ms':>8} {'GB/step':>8} {'TB/s':>6} {'roofline':>8}")
    for bs in batch_sizes:
        prompts = torch.randint(3, cfg.vocab_size, (bs, args.prompt_len), generator=gen).tolist()
        try:
            engine.generate(prompts, 2)  # warm up (allocates the KV buffers)
            torch.cuda.synchronize()
            full = prefill = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                engine.generate(prompts, 1)
                torch.cuda.synchronize()
                prefill = min(prefill, time.perf_counter() - t0)
                t0 = time.perf_counter()
                out = engine.generate(prompts, args.new_tokens)
                torch.cuda.synchronize()
                full = min(full, time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            print(f"{bs:>5} out of GPU memory")
            break
        tokens = sum(map(len, out))
        step = max(full - prefill, 1e-9) / max(args.new_tokens - 1, 1)
        mean_len = args.prompt_len + args.new_tokens / 2
        step_bytes = weight_bytes + bs * mean_len * kv_bytes_per_pos
        tbps = step_bytes / step / 1e12
        frac = f"{tbps / peak:8.1%}" if peak else f"{'?':>8}"
        print(f"{bs:>5} {tokens / full:>10,.0f} {step * 1e3:>8.2f} {step_bytes / 1e9:>8.2f} {tbps:>6.2f} {frac}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
