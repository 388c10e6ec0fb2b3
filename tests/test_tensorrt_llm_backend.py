"""Contract tests for rackbench.engines.tensorrt_llm against the TensorRT-LLM 1.2.x spec.

The in-process runner is exercised against tests/fakes/tensorrt_llm, a FAKE
module implementing only the documented surface.
"""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAKES = ROOT / "tests" / "fakes"

from rackbench import trtllm_launch, trtllm_options  # noqa: E402
from rackbench.engines import tensorrt_llm as trt  # noqa: E402

# The facts are package data (what the config check reads); sections still in the tests'
# own spec file are merged over them.
PACKAGE_SPEC = ROOT / "scripts/rackbench/contracts/trtllm_1_2.yaml"
SPEC = {
    **yaml.safe_load(PACKAGE_SPEC.read_text()),
    **(yaml.safe_load((ROOT / "tests/contracts/trtllm_1_2_spec.yaml").read_text()) or {}),
}

GB300 = {"compute_capability": "10.3", "runs_nvfp4": True}


@pytest.fixture
def fake_trtllm(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKES))
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    mod = importlib.import_module("tensorrt_llm")
    assert mod.FAKE is True
    mod.CONSTRUCTED.clear()
    return mod


def _gpu():
    return {"name": "NVIDIA GB300", "compute_capability": "10.3", "count": 4}


def test_module_does_not_import_tensorrt_llm():
    code = (
        "import sys, rackbench.engines.tensorrt_llm, rackbench.engines.replicas;"
        "assert 'tensorrt_llm' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------- trtllm-build flags


def _check_flag(flag, value):
    spec = SPEC["trtllm_build"]["flags"].get(flag)
    assert spec is not None, f"--{flag} is not a trtllm-build 1.2 flag"
    assert "source" in spec
    kind = spec["type"]
    if kind == "int":
        assert str(value).isdigit(), f"--{flag} {value!r} is not an int"
    elif kind == "enable_disable":
        assert value in ("enable", "disable"), f"--{flag} takes enable|disable, got {value!r}"
    elif kind == "choice":
        assert value in spec["choices"], f"--{flag} {value!r} not in {spec['choices']}"


def test_every_trtllm_build_flag_is_in_the_spec():
    cmd = trt.trtllm_build_command("/ckpt", "/out", {"tensor_parallel_size": 2})
    assert cmd[0] == SPEC["trtllm_build"]["executable"]
    args = cmd[1:]
    assert len(args) % 2 == 0
    pairs = dict(zip(args[::2], args[1::2]))
    for flag, value in pairs.items():
        assert flag.startswith("--")
        _check_flag(flag[2:], value)
    assert set(f[2:] for f in pairs).isdisjoint(SPEC["trtllm_build"]["not_flags"])


def test_trtllm_build_has_the_record_flags():
    flags = trt.trtllm_build_flags({})
    expected = {
        "gemm_plugin": "nvfp4",
        "use_paged_context_fmha": "enable",
        "use_fp8_context_fmha": "enable",
        "kv_cache_type": "paged",
        "tokens_per_block": 32,
        "max_batch_size": 2048,
        "max_num_tokens": 4096,
        "max_input_len": 1024,
        "max_seq_len": 2048,
        "multiple_profiles": "enable",
        "use_fused_mlp": "enable",
        "norm_quant_fusion": "enable",
    }
    for key, value in expected.items():
        assert flags[key] == value, key
    assert "workers" not in flags  # tp*pp == 1


def test_extra_build_flags_are_checked_too():
    cmd = trt.trtllm_build_command("/c", "/o", {"trtllm_build_extra_flags": {"reduce_fusion": "enable"}})
    pairs = dict(zip(cmd[1::2], cmd[2::2]))
    assert pairs["--reduce_fusion"] == "enable"
    bad = trt.trtllm_build_command("/c", "/o", {"trtllm_build_extra_flags": {"use_fp8_kv_cache": "enable"}})
    with pytest.raises(AssertionError):
        for flag, value in zip(bad[1::2], bad[2::2]):
            _check_flag(flag[2:], value)


# ----------------------------------------------------------------- LLM-API options


def _check_fields(values, fields, where):
    for key, value in values.items():
        assert key in fields, f"{where}.{key} is not a TensorRT-LLM 1.2 LLM-API field"
        spec = fields[key]
        assert "source" in spec
        if value is None and spec.get("nullable"):
            continue
        if spec["type"] == "object":
            _check_fields(value, spec["fields"], f"{where}.{key}")
        elif spec["type"] == "choice":
            assert value in spec["choices"], f"{where}.{key}={value!r}"
        elif spec["type"] == "int":
            assert isinstance(value, int) and not isinstance(value, bool), f"{where}.{key}"
        elif spec["type"] == "bool":
            assert isinstance(value, bool), f"{where}.{key}"
        elif spec["type"] == "float":
            assert spec.get("min", 0) <= value <= spec.get("max", 1e30), f"{where}.{key}"


def test_extra_llm_api_options_fields_are_in_the_spec(tmp_path):
    options = trt.write_llm_api_options(tmp_path / "x.yaml", {})
    assert trt.read_llm_api_options(tmp_path / "x.yaml") == options
    _check_fields(options, SPEC["llm_args"]["fields"], "llm_args")
    assert options == {
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "max_batch_size": 2048,
        "max_num_tokens": 4096,
        "max_input_len": 1024,
        "max_seq_len": 2048,
        "enable_chunked_prefill": True,
        "kv_cache_config": {"dtype": "fp8", "free_gpu_memory_fraction": 0.95, "enable_block_reuse": False},
        "scheduler_config": {
            "capacity_scheduler_policy": "MAX_UTILIZATION",
            "context_chunking_policy": "FIRST_COME_FIRST_SERVED",
        },
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "onnx"},
        {"tensor_parallel_size": 0},
        {"max_input_len": 4096, "max_seq_len": 2048},
        {"kv_cache": {"dtype": "int8"}},
        {"kv_cache": {"free_gpu_memory_fraction": 1.5}},
        {"scheduler_policy": "max_util"},
        {"runtime_max_num_tokens": 9999},
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        trt.resolve_settings(bad)


# ----------------------------------------------------------------- build


def test_build_pytorch_mode_writes_options_and_warmup(tmp_path, fake_trtllm):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    facts = trt.build(ckpt, tmp_path / "eng", gpu_type="GB300", gpu_spec=GB300, settings={}, gpu=_gpu)
    assert (tmp_path / "eng" / trt.EXTRA_OPTIONS_FILE).is_file()
    warm = json.loads((tmp_path / "eng" / trt.WARMUP_FILE).read_text())
    assert warm["gpu"]["compute_capability"] == "10.3" and warm["gpu_type"] == "GB300"
    assert warm["tensorrt_llm_version"] == "1.2.1" and warm["generated_tokens"] > 0
    assert facts["mode"] == "pytorch" and facts["model_dir"] == str(ckpt.resolve())
    assert facts["compute_capability"] == "10.3"
    name, kwargs, _ = fake_trtllm.CONSTRUCTED[-1]
    assert name == "LLM" and kwargs["kv_cache_config"]["dtype"] == "fp8"


def test_build_refuses_a_node_of_another_gpu_type(tmp_path, fake_trtllm):
    h100 = lambda: {"name": "NVIDIA H100", "compute_capability": "9.0", "count": 4}  # noqa: E731
    with pytest.raises(trt.EngineMismatch):
        trt.build(tmp_path, tmp_path / "e", gpu_type="GB300", gpu_spec=GB300, settings={}, gpu=h100)


def test_build_tensorrt_mode_runs_export_then_trtllm_build(tmp_path, fake_trtllm):
    calls = []

    def export(ckpt, out, s):
        calls.append(("export", Path(out).name, s["tensor_parallel_size"], s["pipeline_parallel_size"]))
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")

    def run(cmd, **kw):
        calls.append(("run", cmd))
        out = Path(cmd[cmd.index("--output_dir") + 1])
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0, "built", "")

    facts = trt.build(
        tmp_path / "ckpt",
        tmp_path / "eng",
        gpu_type="GB300",
        gpu_spec=GB300,
        settings={"mode": "tensorrt", "tensor_parallel_size": 2},
        run=run,
        export=export,
        gpu=_gpu,
    )
    assert calls[0] == ("export", trt.TRT_CHECKPOINT_SUBDIR, 2, 1)
    cmd = calls[1][1]
    assert cmd[:2] == ["trtllm-build", "--checkpoint_dir"] and "--workers" in cmd
    assert facts["trtllm_build_command"] == cmd and facts["tensorrt_llm_version"] == "1.2.1"
    assert not (tmp_path / "eng" / trt.TRT_CHECKPOINT_SUBDIR).exists()
    assert (tmp_path / "eng" / "trtllm-build.log").read_text().startswith("$ trtllm-build")


def test_build_tensorrt_mode_reports_failure(tmp_path, fake_trtllm):
    run = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2, "", "unrecognized arguments")  # noqa: E731
    with pytest.raises(RuntimeError, match="exit code 2"):
        trt.build(
            tmp_path,
            tmp_path / "e",
            gpu_type="GB300",
            gpu_spec=GB300,
            settings={"mode": "tensorrt"},
            run=run,
            export=lambda *a: None,
            gpu=_gpu,
        )


def test_tensorrt_engine_refused_on_other_gpu_or_version():
    facts = {"compute_capability": "10.3", "tensorrt_llm_version": "1.2.1", "gpu_type": "GB300"}
    trt.check_runtime(facts, gpu={"compute_capability": "10.3"}, version="1.2.1")
    with pytest.raises(trt.EngineMismatch, match="compute capability"):
        trt.check_runtime(facts, gpu={"compute_capability": "10.0"}, version="1.2.1")
    with pytest.raises(trt.EngineMismatch, match="TensorRT-LLM 1.3.0"):
        trt.check_runtime(facts, gpu={"compute_capability": "10.3"}, version="1.3.0")


# ----------------------------------------------------------------- running


def _built_pytorch(tmp_path, fake_trtllm, **settings):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    facts = trt.build(
        ckpt, tmp_path / "eng", gpu_type="GB300", gpu_spec=GB300, settings={"warmup": False, **settings}, gpu=_gpu
    )
    return {"backend": "tensorrt-llm", "backend_facts": facts}


def test_in_process_runner_against_fake(tmp_path, fake_trtllm):
    record = _built_pytorch(tmp_path, fake_trtllm)
    engine = trt.load(tmp_path / "eng", record=record, gpu_ids=[0], settings={})
    prompts = [[1, 2, 3], [5] * 9, [7, 8], [1] * 1030]
    out = engine.generate(prompts, 1024)
    params = fake_trtllm.SamplingParams(max_tokens=1024, end_id=2)
    for prompt, ids in zip(prompts, out):
        want, _ = fake_trtllm.fake_answer(prompt, params)
        assert ids == [t for t in want if t != 2]  # EOS stripped, prompt not included
    assert engine.max_batch_size == 2048
    assert engine.generate(prompts, 2) == [o[:2] for o in out]
    sp = engine.sampling_params(1024)
    assert (sp.max_tokens, sp.end_id, sp.top_k, sp.detokenize) == (1024, 2, 1, False)
    for name in ("max_tokens", "end_id", "pad_id", "top_k", "detokenize"):
        assert name in SPEC["sampling_params"]["fields"]
    name, kwargs, _ = fake_trtllm.CONSTRUCTED[-1]
    _check_fields(kwargs, SPEC["llm_args"]["fields"], "LLM")
    engine.close()
    assert engine.llm is None


def test_submit_streams_only_when_the_first_token_is_wanted(tmp_path, fake_trtllm):
    """submit() runs LLM.generate_async on the engine's event loop: streamed (first chunk ->
    on_first_token) when a first token is wanted, not streamed otherwise; the answers are the
    generated ids before the end id, as with the blocking path."""
    import inspect
    import threading

    record = _built_pytorch(tmp_path, fake_trtllm)
    engine = trt.load(tmp_path / "eng", record=record, gpu_ids=[0], settings={})
    spec = SPEC["async_generation"]["generate_async"]
    params = inspect.signature(fake_trtllm.LLM.generate_async).parameters
    assert [p for p in params if p not in ("self", "inputs")] == spec["kwargs"]  # the fake is the spec
    try:
        assert engine.max_in_flight == 2048
        prompts = [[1, 2, 3], [5] * 9, [7, 8, 9, 10]]
        events, finished = [], threading.Semaphore(0)
        for i, p in enumerate(prompts):
            engine.submit(
                p,
                1024,
                on_done=lambda t, i=i: (events.append(("done", i, t)), finished.release()),
                on_error=lambda e: (events.append(("error", e)), finished.release()),
                on_first_token=(lambda tok, i=i: events.append(("first", i, tok))) if i != 1 else None,
            )
        for _ in prompts:
            finished.acquire()
        sp = fake_trtllm.SamplingParams(max_tokens=1024, end_id=2)
        for i, p in enumerate(prompts):
            want = [t for t in fake_trtllm.fake_answer(p, sp)[0] if t != 2]
            assert ("done", i, want) in events
            firsts = [e for e in events if e[0] == "first" and e[1] == i]
            assert firsts == ([] if i == 1 else [("first", i, want[0])])
            if firsts:
                assert events.index(firsts[0]) < events.index(("done", i, want))
        llm = engine.llm
        assert llm.async_requests == [(prompts[0], True), (prompts[1], False), (prompts[2], True)]
        assert set(spec["kwargs"]) >= {"sampling_params", "streaming"}  # what submit passes
        assert engine.generate(prompts, 2) == [
            [t for t in fake_trtllm.fake_answer(p, sp)[0] if t != 2][:2] for p in prompts
        ]
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1], 4, on_done=print, on_error=print)


def test_a_result_made_outside_an_event_loop_has_no_async_side(tmp_path, fake_trtllm):
    """The fact the engine's event-loop thread exists for (executor/result.py has_event_loop)."""
    import asyncio

    llm = fake_trtllm.LLM(model=str(tmp_path))
    try:
        result = llm.generate_async([4, 5, 6], sampling_params=fake_trtllm.SamplingParams(max_tokens=8, end_id=2))
        assert result.aqueue is None and result.result().finished
        with pytest.raises(AssertionError, match="event loop was not present"):
            asyncio.run(llm.generate_async([4, 5], streaming=True).aresult())
    finally:
        llm.shutdown()
    with pytest.raises(RuntimeError, match="shutting down"):
        llm.generate_async([1])


def test_tensorrt_mode_uses_the_trt_engine_class(tmp_path, fake_trtllm, monkeypatch):
    eng = tmp_path / "eng" / trt.TRT_ENGINE_SUBDIR
    eng.mkdir(parents=True)
    (eng / "config.json").write_text("{}")
    monkeypatch.setattr(trt, "gpu_facts", _gpu)
    facts = {
        "mode": "tensorrt",
        "compute_capability": "10.3",
        "tensorrt_llm_version": "1.2.1",
        "tensor_parallel_size": 1,
        "pipeline_parallel_size": 1,
        "engine_subdir": trt.TRT_ENGINE_SUBDIR,
    }
    engine = trt.load(tmp_path / "eng", record={"backend_facts": facts}, gpu_ids=[0], settings={})
    assert engine.generate([[4, 4, 4]], 16)
    name, kwargs, _ = fake_trtllm.CONSTRUCTED[-1]
    assert name == "LLM" and type(engine.llm).__module__ == "tensorrt_llm._tensorrt_engine"
    _check_fields(kwargs, SPEC["llm_args"]["fields"], "TrtLLM")
    engine.close()
    monkeypatch.setattr(trt, "trtllm_version", lambda: "1.3.0")
    with pytest.raises(trt.EngineMismatch):
        trt.load(tmp_path / "eng", record={"backend_facts": facts}, gpu_ids=[0], settings={})


def test_load_rejects_gpu_counts_that_do_not_divide(tmp_path, fake_trtllm):
    record = _built_pytorch(tmp_path, fake_trtllm, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="divide"):
        trt.load(tmp_path / "eng", record=record, gpu_ids=[0, 1, 2], settings={})
    with pytest.raises(ValueError, match="needs GPUs"):
        trt.load(tmp_path / "eng", record=record, gpu_ids=[], settings={})


def test_shard_with_four_gpus_runs_four_replicas(tmp_path, fake_trtllm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    record = _built_pytorch(tmp_path, fake_trtllm)
    engine = trt.load(tmp_path / "eng", record=record, gpu_ids=[0, 1, 2, 3], settings={})
    try:
        assert engine.num_replicas == 4 and engine.replica_devices == ["4", "5", "6", "7"]
        assert engine.max_batch_size == 4 * 2048
        prompts = [[i, i + 1] * (i % 4 + 1) for i in range(10)]
        single = trt.load(tmp_path / "eng", record=record, gpu_ids=[0], settings={})
        assert engine.generate(prompts, 1024) == single.generate(prompts, 1024)
    finally:
        engine.close()


def test_real_config_engine_settings_and_gpu_table():
    cfg = yaml.safe_load((ROOT / "config/llama2-70b-gb300.yaml").read_text())
    s = trt.resolve_settings(cfg["engines"]["tensorrt-llm"])
    _check_fields(trt.llm_api_options(s), SPEC["llm_args"]["fields"], "llm_args")
    assert (s["tensor_parallel_size"], s["pipeline_parallel_size"], s["max_batch_size"]) == (1, 1, 3072)
    assert (s["max_num_tokens"], s["runtime_max_num_tokens"], s["max_seq_len"]) == (4608, 4608, 2048)
    options = trt.llm_api_options(s)
    assert options["cuda_graph_config"] is None  # NVIDIA's use_graphs False
    assert options["torch_compile_config"]["enable_piecewise_cuda_graph"] is True
    assert options["torch_compile_config"]["capture_num_tokens"][-1] == 4608
    assert cfg["run"]["rack_target_qps"] == {"Offline": 4320, "Server": 3200, "Interactive": 3000}
    nvidia = ROOT.parent / "shared/mlperf-logs/v6.0_NVIDIA_GB300-NVL72_x72_TRT_submission/closed/NVIDIA/results"
    for scenario, qps in cfg["run"]["rack_target_qps"].items():  # as NVIDIA's user.conf of the record says
        conf = nvidia / "GB300-NVL72_GB300-288GB_aarch64x72_TRT/llama2-70b-99" / scenario / "user.conf"
        if conf.is_file():
            assert re.search(rf"\.target_qps = {qps}(\.0)?\n", conf.read_text()), (scenario, qps)
    assert cfg["run"]["offline_expected_qps"] * cfg["rack"]["nodes"] * cfg["rack"]["gpus_per_node"] == 4320
    text = (ROOT / "config/llama2-70b-gb300.yaml").read_text()
    assert "feat/1.2-mlpinf" in text and "GB300-NVL72_GB300-288GB_aarch64x1/Offline/llama2-70b.py" in text
    gpus = cfg["gpu_types"]
    assert set(gpus) == {"H100", "H200", "B200", "GB200", "GB300"}
    system = (
        json.loads(
            (
                ROOT.parent / "shared/mlperf-logs/v6.0_NVIDIA_GB300-NVL72_x72_TRT_submission/closed/NVIDIA/"
                "systems/GB300-NVL72_GB300-288GB_aarch64x72_TRT.json"
            ).read_text()
        )
        if (ROOT.parent / "shared/mlperf-logs").is_dir()
        else {"accelerator_memory_capacity": "288 GB"}
    )
    assert gpus["GB300"]["memory_gb"] == float(system["accelerator_memory_capacity"].split()[0])
    for name, g in gpus.items():
        assert g["runs_nvfp4"] == name.startswith(("B", "GB")), name
        assert (g["peak_dense_flops"]["fp4"] is None) == (not g["runs_nvfp4"]), name
        assert g["peak_dense_flops"]["source"] and g["published"]["source"]
        assert g["slurm"]["gpu_model"] == name.lower()


# ----------------------------------------------------------------- contract data = config check


def test_config_check_reads_the_same_facts_as_these_tests():
    assert trtllm_options.CONTRACTS_DIR / "trtllm_1_2.yaml" == PACKAGE_SPEC
    data = trtllm_options.trtllm_contract()
    assert data["trtllm_build"] == SPEC["trtllm_build"] and data["llm_args"] == SPEC["llm_args"]
    assert trt.SCHEDULER_POLICIES == tuple(
        SPEC["llm_args"]["fields"]["scheduler_config"]["fields"]["capacity_scheduler_policy"]["choices"]
    )
    assert data["target_release"] == "1.2.1"
    assert data["container"]["image"] == "nvcr.io/nvidia/tensorrt-llm/release:1.2.1"
    # the ModelOpt TensorRT-LLM's requirements.txt pins is the one contracts/modelopt.yaml calls the container's
    modelopt = trtllm_options.load_contract("modelopt")
    pin = data["requirements"]["pins"]["nvidia-modelopt"]
    assert pin == "nvidia-modelopt[torch]~=0.37.0" and modelopt["container_version"].startswith("0.37.")


def _walk_sources(node, path=()):
    if isinstance(node, dict):
        if "type" in node and node.get("type") != "object" and path and path[-2:-1] in (("flags",), ("fields",)):
            yield path, node
        for key, value in node.items():
            yield from _walk_sources(value, path + (key,))


def test_every_fact_names_its_source_file():
    facts = list(_walk_sources({k: SPEC[k] for k in ("trtllm_build", "llm_args", "sampling_params")}))
    assert len(facts) > 40
    for path, fact in facts:
        assert fact.get("source"), ".".join(path)
        assert re.search(r"(\.py|build\.py|plugin\.py|llm_args)", fact["source"]), ".".join(path)


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            {"mode": "tensorrt", "trtllm_build_extra_flags": {"warp_speed": 9}},
            "trtllm_build_extra_flags.warp_speed: not a trtllm-build 1.2 flag; allowed flags: context_fmha,",
        ),
        (
            {"mode": "tensorrt", "trtllm_build_extra_flags": {"gemm_plugin": "int3"}},
            "gemm_plugin: 'int3' is not one of auto, float16, float32, bfloat16, int32, fp8, nvfp4, disable",
        ),
        (
            {"mode": "tensorrt", "trtllm_build_extra_flags": {"use_fp8_kv_cache": "enable"}},
            "use_fp8_kv_cache: not a trtllm-build 1.2 flag "
            "(a TensorRT-LLM PluginConfig field, but not a trtllm-build argument)",
        ),
        (
            {"mode": "tensorrt", "trtllm_build_extra_flags": {"reduce_fusion": "on"}},
            "reduce_fusion: 'on' is not one of enable, disable",
        ),
        ({"mode": "tensorrt", "trtllm_build_extra_flags": {"output_dir": "/x"}}, "output_dir: set by rackbench itself"),
        (
            {"torch_compile_config": {"enable_piecewise_cuda_graph": "yes"}},
            "torch_compile_config.enable_piecewise_cuda_graph: 'yes' is not true or false",
        ),
        (
            {"cuda_graph_config": {"batch_sizes": [0, 8]}},
            "cuda_graph_config.batch_sizes: [0, 8] is not a non-empty list",
        ),
        (
            {"scheduler_policy": "max_util"},
            "scheduler_policy 'max_util' not in ('MAX_UTILIZATION', 'GUARANTEED_NO_EVICT', 'STATIC_BATCH')",
        ),
    ],
)
def test_config_time_check_names_option_and_allowed_values(settings, message):
    with pytest.raises(trtllm_options.OptionError) as err:
        trtllm_options.check_engine_options(settings)
    assert str(err.value).startswith("engines.tensorrt-llm") and message in str(err.value)


def test_good_options_pass_the_config_time_check():
    trtllm_options.check_engine_options({"mode": "tensorrt", "trtllm_build_extra_flags": {"reduce_fusion": "enable"}})
    trtllm_options.check_engine_options(
        {
            "cuda_graph_config": None,
            "torch_compile_config": {"enable_piecewise_cuda_graph": True, "capture_num_tokens": [1, 2, 4]},
        }
    )
    assert trtllm_options.main([str(ROOT / "config/llama2-70b-gb300.yaml")]) == 0


# ----------------------------------------------------------------- trtllm-llmapi-launch


def test_launch_command_follows_the_llmapi_launch_contract():
    facts = SPEC["llmapi_launch"]
    assert facts["source"] == "tensorrt_llm/llmapi/trtllm-llmapi-launch"
    assert trtllm_launch.launcher() == facts["executable"] == "trtllm-llmapi-launch"
    # the launcher takes the whole command line after it (task_with_command="${@:1}")
    serve = ["trtllm-serve", "/models/llama", "--port", "8000", "--config", "/e/extra_llm_api_options.yaml"]
    assert trtllm_launch.launch_command(serve) == ["trtllm-llmapi-launch", *serve]
    assert trtllm_launch.launch_command(trtllm_launch.launch_command(serve)) == ["trtllm-llmapi-launch", *serve]
    assert trtllm_launch.launch_prefix("tensorrt-llm") == "trtllm-llmapi-launch "
    assert trtllm_launch.launch_prefix("reference") == ""
    # world size = Slurm tasks = tp x pp (examples/llm-api/llm_mgmn_*.sh)
    assert trtllm_launch.slurm_tasks({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}) == 4
    assert trtllm_launch.slurm_tasks({}) == 1
    assert "SLURM_PROCID" in facts["rank_from"] and "SLURM_NTASKS" in facts["world_size_from"]


def test_rules_launch_tensorrt_llm_jobs_through_the_launcher():
    """run_shard and build_engine (whose pytorch-mode warm-up creates an LLM) prefix their command."""
    for rule in ("rules/run.smk", "rules/engine.smk"):
        text = (ROOT / rule).read_text()
        assert "launch=lambda wc: launch_prefix(wc.backend)" in text, rule
        # the command itself starts with the launcher (after the settings.json write)
        assert re.search(r'(^|"|&& )\{params\.launch\}python -m rackbench\.', text, re.M), rule
