"""The embedded demo's assets: a tiny Llama, its tokenizer and an OpenOrca-shaped dataset.

Everything is made locally from a seed (no network), deterministically.

``python -m rackbench.demo model --out DIR --seed 0 [--hidden-size ...]``
    A tiny ``LlamaForCausalLM`` (safetensors) plus a BPE tokenizer trained on a
    synthetic English-like corpus (``<unk>``=0, ``<s>``=1, ``</s>``=2).

``python -m rackbench.demo dataset --model DIR --out DIR [--num-samples ...]``
    ``open_orca_gpt4_tokenized_llama.sampled_24576.pkl`` and
    ``open_orca_gpt4_tokenized_llama.calibration_1000.pkl`` (MLPerf's column layout)
    plus ``SHA256SUMS``. ``output`` is the unquantized model's greedy continuation:
    the demo's accuracy reference.

Why the weights are *compiled*, not random or trained: a random-weight model has
near-uniform logits, so greedy argmax flips under any quantization noise and the
ROUGE gate would fail good NVFP4 as often as broken NVFP4. Training to peaked
logits costs minutes on 2 CPU cores. Instead the weights implement, exactly, the
greedy bigram model of the synthetic corpus:

* embeddings and ``lm_head`` are independent random codebooks (untied), so the
  direct embedding -> lm_head path predicts nothing useful;
* layer 0's MLP is a lookup table: one intermediate unit per known token whose
  gate/up rows match that token's (normalized) embedding and whose down column
  writes the ``lm_head`` code of the token's most frequent successor.

The correct logit then wins by a wide margin (peaked logits) that NVFP4's ~4.5-bit
noise does not overturn, while zeroed or randomly scaled weight scales destroy the
lookup and the outputs turn to noise. Attention and layer 1 keep small random
(init-like) weights: they run, get quantized, and add harmless noise.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

from rackbench.atomic import atomic_path, sha256_file
from rackbench.config import schema_defaults
from rackbench.padding import pad_batch

SAMPLES_PKL = "open_orca_gpt4_tokenized_llama.sampled_24576.pkl"
CALIBRATION_PKL = "open_orca_gpt4_tokenized_llama.calibration_1000.pkl"
UNK, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]

# Word classes of the synthetic language and which classes may follow which.
# A noun phrase is a determiner (+ adjective) + noun, or a name on its own.
WORDS = {
    "DET": ("the a this that every some my our your their his her each another one no any its either neither").split(),
    "NAME": (
        "anna ben clara david emma felix grace henry ivy jack kate leo mia noah olive paul rosa sam tara victor"
    ).split(),
    "ADJ": (
        "red quick lazy small bright quiet old young green happy tired clever "
        "brave cold warm dark gentle proud calm wild"
    ).split(),
    "NOUN": (
        "fox dog cat bird river tree house garden child teacher farmer city "
        "road window market letter ship mountain forest lamp bridge island "
        "painter doctor baker storm morning winter book song wolf horse owl boat "
        "valley hill meadow castle village harbor kettle candle wagon orchard"
    ).split(),
    "VERB": (
        "sees finds likes follows watches builds opens carries paints visits "
        "crosses remembers reads hears meets helps loves guards greets draws calls "
        "chases feeds fixes"
    ).split(),
    "ADV": "slowly quickly often never gladly quietly again today softly rarely always early".split(),
    "PREP": "near under over behind beside across into along around through toward past".split(),
}
HEADS = ("DET", "NAME")  # every noun phrase starts with one of these
NEXT_CLASSES = {
    "DET": ["ADJ", "NOUN"],
    "ADJ": ["NOUN"],
    "NOUN": ["VERB", "PREP", "END.", "END!"],
    "NAME": ["VERB", "PREP", "END.", "END!"],
    "VERB": ["DET", "NAME", "ADV"],
    "ADV": ["PREP", "END."],
    "PREP": ["DET", "NAME"],
}
P_DOMINANT = 0.8  # how often a word is followed by its own favourite successor


class Language:
    """A seeded word-level Markov chain: each word has one dominant successor.

    Sentence ends are written onto the word (``fox.`` / ``fox!``) so that what
    follows a sentence depends on how it ended; ``!`` ends the document.
    """

    def __init__(self, seed: int):
        rng = random.Random(f"rackbench-demo-language-{seed}")
        self.word_class = {w: c for c, ws in WORDS.items() for w in ws}
        pool = {c: rng.sample(ws, len(ws)) for c, ws in WORDS.items()}
        self.favourite: dict[str, str] = {}
        self.after_period: dict[str, str] = {}
        # The favourite paths form one chain of clauses through all the noun-phrase heads
        # (determiners and names), H0 -> H1 -> ... -> H39 -> "!", several sentences long,
        # so greedy decoding always reaches EOS (no cycles: every cycle would have to
        # pass a head) and where a prompt joins the chain sets how long the answer is.
        heads = rng.sample(self.heads, len(self.heads))
        for i, head in enumerate(heads):
            nxt = heads[i + 1] if i + 1 < len(heads) else None
            if self.word_class[head] == "NAME":
                noun = head
            else:
                noun = pool["NOUN"].pop()
                if pool["ADJ"] and rng.random() < 0.75:
                    adj = pool["ADJ"].pop()
                    self.favourite[head], self.favourite[adj] = adj, noun
                else:
                    self.favourite[head] = noun
            if nxt is None:
                self.favourite[noun] = "END!"
                continue
            shapes = ["period"] + (["prep"] if pool["PREP"] else []) + (["verb"] if pool["VERB"] else [])
            if pool["VERB"] and pool["ADV"] and pool["PREP"]:
                shapes += ["verb-adv"] * 2  # the longest clause, while its words last
            shape = rng.choice(shapes)
            if shape == "period":
                self.favourite[noun], self.after_period[noun] = "END.", nxt
            elif shape == "prep":
                prep = pool["PREP"].pop()
                self.favourite[noun], self.favourite[prep] = prep, nxt
            else:
                verb = pool["VERB"].pop()
                self.favourite[noun] = verb
                if shape == "verb":
                    self.favourite[verb] = nxt
                else:
                    adv, prep = pool["ADV"].pop(), pool["PREP"].pop()
                    self.favourite[verb], self.favourite[adv], self.favourite[prep] = adv, prep, nxt
        # Words off the chain get any grammatical favourite; they run into the
        # chain, mostly near its start so that answers are not all short.
        early = heads[:3]
        for word, cls in self.word_class.items():
            if word not in self.favourite:
                pick = rng.choice(self._options(cls))
                self.favourite[word] = rng.choice(early) if pick in self.heads else pick
        for word in WORDS["NOUN"] + WORDS["NAME"] + WORDS["ADV"]:
            self.after_period.setdefault(word, rng.choice(early))

    @property
    def heads(self) -> list[str]:
        return [w for c in HEADS for w in WORDS[c]]

    def step(self, word: str) -> str | None:
        """The favourite next word (None: end of document)."""
        if word.endswith("!"):
            return None
        if word.endswith("."):
            return self.after_period[word[:-1]]
        nxt = self.favourite[word]
        return word + nxt[-1] if nxt.startswith("END") else nxt

    def greedy_length(self, word: str, limit: int = 400) -> int | None:
        """Words the favourite path from ``word`` takes to the end (None: a cycle).

        A sentence end is written onto its word, so it costs no word of its own.
        """
        n = 0
        while (word := self.step(word)) is not None:
            n += 1
            if n > limit:
                return None
            if word.endswith((".", "!")):
                n -= 1
        return n

    @staticmethod
    def _options(cls: str) -> list[str]:
        out = []
        for nxt in NEXT_CLASSES[cls]:
            out += [nxt] if nxt.startswith("END") else WORDS[nxt]
        return out

    def document(self, rng: random.Random, max_words: int) -> list[str]:
        """Words of one document (punctuation attached); ends early on ``!``."""
        heads = self.heads
        words = [rng.choice(heads)]
        while len(words) < max_words:
            last = words[-1]
            if last.endswith("!"):
                break
            if rng.random() < P_DOMINANT:
                nxt = self.step(last)
            elif last.endswith("."):
                nxt = rng.choice(heads)
            else:
                choice = rng.choice(self._options(self.word_class[last]))
                nxt = last + choice[-1] if choice.startswith("END") else choice
            if nxt.endswith((".", "!")) and nxt[:-1] == last:
                words[-1] = nxt
            else:
                words.append(nxt)
        return words


def corpus(seed: int, num_docs: int = 1500, max_words: int = 80) -> list[str]:
    lang = Language(seed)
    rng = random.Random(f"rackbench-demo-corpus-{seed}")
    return [" ".join(lang.document(rng, max_words)) for _ in range(num_docs)]


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A Llama-layout BPE (sentencepiece-style ``▁`` word marker, bos prepended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK, BOS, EOS]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=4096
    )


# ---------------------------------------------------------------- model


def successor_table(tokenizer, texts: list[str]) -> dict[int, int]:
    """Most frequent next token of every token seen in the corpus (ties: lowest id)."""
    counts: dict[int, Counter] = {}
    for ids in tokenizer(texts)["input_ids"]:
        # Only a document that ended with "!" is followed by EOS (others were cut).
        seq = list(ids) + ([EOS] if tokenizer.convert_ids_to_tokens(ids[-1]).endswith("!") else [])
        for a, b in zip(seq[:-1], seq[1:]):
            counts.setdefault(a, Counter())[b] += 1
    return {a: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for a, c in counts.items()}


# The model command's shape options, each with the LlamaConfig field it sets (the key in the
# config's demo.model).
MODEL_OPTIONS = {
    "hidden-size": "hidden_size",
    "intermediate-size": "intermediate_size",
    "num-layers": "num_hidden_layers",
    "num-heads": "num_attention_heads",
    "num-kv-heads": "num_key_value_heads",
    "vocab-size": "vocab_size",
}


def compile_model(args, successors: dict[int, int]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if len(successors) > args.intermediate_size:
        raise SystemExit(
            f"demo: {len(successors)} known tokens exceed intermediate size "
            f"{args.intermediate_size}; the lookup MLP needs one unit per token"
        )
    config = LlamaConfig(
        **{key: getattr(args, option.replace("-", "_")) for option, key in MODEL_OPTIONS.items()},
        max_position_embeddings=2048,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        tie_word_embeddings=False,
        dtype="float32",
    )
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).eval()
    d = args.hidden_size
    state = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            state[name] = torch.ones_like(p)
        else:  # init-like small weights; the lookup below overwrites what matters
            state[name] = torch.randn(p.shape, generator=gen) * 0.02
    emb = torch.randn(args.vocab_size, d, generator=gen)  # rms ~1 per token
    codes = torch.randn(args.vocab_size, d, generator=gen)  # lm_head codebook
    state["model.embed_tokens.weight"] = emb
    state["lm_head.weight"] = codes / 8  # logit gap ~30 nats: peaked but finite

    # Layer 0 MLP as a lookup table (see module docstring). After RMSNorm the
    # input is ~sqrt(d) * unit(emb[t]); unit k matches it with gain GATE so the
    # own unit fires at silu(GATE*sqrt(d))*GATE*sqrt(d) while others stay O(1).
    GATE = 1.0
    units = sorted(successors)
    unit_dirs = torch.nn.functional.normalize(emb[units], dim=-1)
    gate = torch.zeros(args.intermediate_size, d)
    up = torch.zeros(args.intermediate_size, d)
    down = torch.zeros(d, args.intermediate_size)
    gate[: len(units)] = GATE * unit_dirs
    up[: len(units)] = GATE * unit_dirs
    own = GATE * d**0.5
    own_activation = own * own / (1 + torch.exp(torch.tensor(-own)))
    # Write the successor's code at ~10x the embedding's norm, so the residual
    # stream (and after the final RMSNorm the lm_head input) points at it.
    target = 10 * d**0.5
    succ_codes = torch.nn.functional.normalize(codes[[successors[t] for t in units]], dim=-1)
    down[:, : len(units)] = (succ_codes * (target / own_activation)).T
    state["model.layers.0.mlp.gate_proj.weight"] = gate
    state["model.layers.0.mlp.up_proj.weight"] = up
    state["model.layers.0.mlp.down_proj.weight"] = down
    model.load_state_dict(state, strict=True)
    model.generation_config.pad_token_id = EOS
    model.generation_config.do_sample = False
    return model


def make_model(args) -> None:
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    texts = corpus(args.seed)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    if len(tokenizer) > args.vocab_size:
        raise SystemExit(f"demo: tokenizer has {len(tokenizer)} tokens > vocab {args.vocab_size}")
    model = compile_model(args, successor_table(tokenizer, texts))
    with atomic_path(args.out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    print(
        f"demo model: {sum(p.numel() for p in model.parameters())} params, "
        f"tokenizer {len(tokenizer)} tokens -> {args.out}"
    )


# ---------------------------------------------------------------- dataset


def greedy(
    model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16, *, eos: int = EOS
) -> list[list[int]]:
    """transformers' greedy ``generate``: ids per prompt, cut before the first ``eos`` (as the
    engine contract says). ``batch_size=1`` (no padding) is the unbatched reference the
    reference engine's tests and benchmark compare it with."""
    import torch

    outs = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = pad_batch(prompts[i : i + batch_size], eos, side="left")
        width = ids.shape[1]
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        for row in gen[:, width:].tolist():
            outs.append(row[: row.index(eos)] if eos in row else row)
    return outs


def _prompts(
    lang: Language, tokenizer, rng: random.Random, n: int, seen: set[str], min_tokens: int, max_tokens: int
) -> list[dict]:
    rows = []
    while len(rows) < n:
        target = rng.randint(min_tokens, max_tokens)
        system = " ".join(lang.document(rng, rng.randint(4, 10)))
        words: list[str] = []
        while True:  # documents back to back until the prompt is long enough
            words += lang.document(rng, 200)
            question = " ".join(words)
            ids = tokenizer(system + " " + question)["input_ids"]
            if len(ids) >= target:
                break
        # Cut at a word boundary (keeps text and ids consistent) near the target.
        keep = len(words)
        while (
            keep > 1
            and (
                words[keep - 1].endswith("!")  # "!" would leave nothing to answer
                or len(tokenizer(system + " " + " ".join(words[:keep]))["input_ids"]) > target
            )
        ):
            keep -= 1
        question = " ".join(words[:keep])
        text = system + " " + question
        if text in seen:
            continue
        seen.add(text)
        rows.append(
            {"system_prompt": system, "question": question, "input": text, "tok_input": tokenizer(text)["input_ids"]}
        )
    return rows


def make_dataset(args) -> None:
    import pandas as pd
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    lang = Language(args.seed)
    rng = random.Random(f"rackbench-demo-dataset-{args.seed}")
    seen: set[str] = set()
    # Benchmark and calibration prompts come from one stream with a shared
    # `seen` set, so the two sets are disjoint.
    bench = _prompts(lang, tokenizer, rng, args.num_samples, seen, args.min_prompt_tokens, args.max_prompt_tokens)
    calib = _prompts(lang, tokenizer, rng, args.num_calibration, seen, args.min_prompt_tokens, args.max_prompt_tokens)
    frames = {}
    for name, rows, prefix in ((SAMPLES_PKL, bench, "demo"), (CALIBRATION_PKL, calib, "demo-calib")):
        outs = greedy(model, [r["tok_input"] for r in rows], args.max_new_tokens)
        for i, (row, out) in enumerate(zip(rows, outs)):
            row["id"] = f"{prefix}.{i}"
            row["output"] = tokenizer.decode(out, skip_special_tokens=True)
            row["tok_output"] = out
        frames[name] = pd.DataFrame(
            rows, columns=["id", "system_prompt", "question", "input", "output", "tok_input", "tok_output"]
        )
    with atomic_path(args.out, directory=True) as tmp:
        for name, df in frames.items():
            df.to_pickle(tmp / name, protocol=4)
        (tmp / "SHA256SUMS").write_text("".join(f"{sha256_file(tmp / name)}  {name}\n" for name in sorted(frames)))
    lens = [len(t) for t in frames[SAMPLES_PKL]["tok_output"]]
    print(
        f"demo dataset: {len(bench)} samples + {len(calib)} calibration, output tokens "
        f"min {min(lens)} mean {sum(lens) / len(lens):.1f} max {max(lens)} -> {args.out}"
    )


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rackbench.demo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="write the tiny model + tokenizer")
    m.add_argument("--out", required=True, type=Path)
    defaults = schema_defaults("demo")  # the config schema's, the only defaults
    shape = defaults["model"]
    m.add_argument("--seed", type=int, default=defaults["seed"])
    for option, key in MODEL_OPTIONS.items():
        m.add_argument(f"--{option}", type=int, default=shape[key])
    d = sub.add_parser("dataset", help="write the OpenOrca-shaped pickles + SHA256SUMS")
    d.add_argument("--model", required=True, type=Path)
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--num-samples", type=int, default=defaults["num_samples"])
    d.add_argument("--num-calibration", type=int, default=defaults["num_calibration"])
    d.add_argument("--max-new-tokens", type=int, default=defaults["reference_max_new_tokens"])
    d.add_argument("--min-prompt-tokens", type=int, default=defaults["min_prompt_tokens"])
    d.add_argument("--max-prompt-tokens", type=int, default=defaults["max_prompt_tokens"])
    d.add_argument("--seed", type=int, default=defaults["seed"])
    args = parser.parse_args(argv)
    if args.command == "model":
        make_model(args)
    else:
        if not (args.model / "config.json").is_file():
            parser.error(f"--model {args.model}: no config.json (run `demo model` first)")
        if args.num_samples < 1 or args.num_calibration < 1:
            parser.error("--num-samples and --num-calibration must be >= 1")
        make_dataset(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
