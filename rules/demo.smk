# The embedded demo makes its own tiny model, tokenizer and dataset, so the whole
# chain runs with no network. Real configs set demo.enabled: false.


rule demo_model:
    output:
        directory(paths.DEMO_MODEL_PATTERN),
    log:
        paths.log_file("demo_model"),
    conda:
        RUN_ENV
    threads: 2
    params:
        seed=DEMO["seed"],
        hidden_size=DEMO["model"]["hidden_size"],
        intermediate_size=DEMO["model"]["intermediate_size"],
        num_layers=DEMO["model"]["num_hidden_layers"],
        num_heads=DEMO["model"]["num_attention_heads"],
        num_kv_heads=DEMO["model"]["num_key_value_heads"],
        vocab_size=DEMO["model"]["vocab_size"],
    shell:
        "python -m rackbench.demo model --out {output} --seed {params.seed}"
        " --hidden-size {params.hidden_size} --intermediate-size {params.intermediate_size}"
        " --num-layers {params.num_layers} --num-heads {params.num_heads} --num-kv-heads {params.num_kv_heads}"
        " --vocab-size {params.vocab_size} > {log} 2>&1"


rule demo_dataset:
    input:
        model=paths.DEMO_MODEL_PATTERN,
    output:
        samples=f"{paths.DEMO_DATASET_DIR}/open_orca_gpt4_tokenized_llama.sampled_24576.pkl",
        calibration=f"{paths.DEMO_DATASET_DIR}/open_orca_gpt4_tokenized_llama.calibration_1000.pkl",
        checksums=f"{paths.DEMO_DATASET_DIR}/SHA256SUMS",
    log:
        paths.log_file("demo_dataset"),
    conda:
        RUN_ENV
    threads: 2
    params:
        out_dir=lambda wc, output: os.path.dirname(output.checksums),
        seed=DEMO["seed"],
        samples=DEMO["num_samples"],
        calibration=DEMO["num_calibration"],
        max_new_tokens=DEMO["reference_max_new_tokens"],
        min_prompt_tokens=DEMO["min_prompt_tokens"],
        max_prompt_tokens=DEMO["max_prompt_tokens"],
    shell:
        "python -m rackbench.demo dataset --model {input.model} --out {params.out_dir} --seed {params.seed}"
        " --num-samples {params.samples} --num-calibration {params.calibration}"
        " --max-new-tokens {params.max_new_tokens} --min-prompt-tokens {params.min_prompt_tokens}"
        " --max-prompt-tokens {params.max_prompt_tokens} > {log} 2>&1"
