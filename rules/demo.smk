# The embedded demo makes its own tiny model, tokenizer and dataset, so the whole
# chain runs with no network. Real configs set demo.enabled: false.

DEMO = config.get("demo", {})


rule demo_model:
    output:
        directory("results/demo/source/model"),
    params:
        seed=DEMO.get("seed", 0),
        shape=" ".join(
            f"--{flag} {DEMO.get('model', {})[key]}"
            for flag, key in [
                ("hidden-size", "hidden_size"),
                ("intermediate-size", "intermediate_size"),
                ("num-layers", "num_hidden_layers"),
                ("num-heads", "num_attention_heads"),
                ("num-kv-heads", "num_key_value_heads"),
                ("vocab-size", "vocab_size"),
            ]
            if key in DEMO.get("model", {})
        ),
    log:
        "results/logs/demo_model.log",
    threads: 2
    conda:
        RUN_ENV
    shell:
        "python -m rackbench.demo model --out {output} --seed {params.seed} {params.shape} > {log} 2>&1"


rule demo_dataset:
    input:
        model="results/demo/source/model",
    output:
        samples="results/demo/source/dataset/open_orca_gpt4_tokenized_llama.sampled_24576.pkl",
        calibration="results/demo/source/dataset/open_orca_gpt4_tokenized_llama.calibration_1000.pkl",
        checksums="results/demo/source/dataset/SHA256SUMS",
    params:
        out_dir=lambda wc, output: os.path.dirname(output.checksums),
        seed=DEMO.get("seed", 0),
        samples=DEMO.get("num_samples", 48),
        calibration=DEMO.get("num_calibration", 16),
        max_new_tokens=DEMO.get("reference_max_new_tokens", 64),
    log:
        "results/logs/demo_dataset.log",
    threads: 2
    conda:
        RUN_ENV
    shell:
        "python -m rackbench.demo dataset --model {input.model} --out {params.out_dir} --seed {params.seed}"
        " --num-samples {params.samples} --num-calibration {params.calibration}"
        " --max-new-tokens {params.max_new_tokens} > {log} 2>&1"
