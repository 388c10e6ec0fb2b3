"""Reliability through Snakemake: killed steps, retried shards, partial reruns,
broken quantization, concurrent invocations. Each test works on a private copy
of one finished demo run (see conftest.demo_run)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import DEMO_CONFIGURATION, DEMO_RUN_DIR, LOCAL_SNAKEMAKE_ENV, snakemake
from conftest import DEMO_STEP_OUTPUTS as STEP_OUTPUTS
from rackbench import paths

pytestmark = pytest.mark.slow

# The module each step's job runs.
STEP_MODULE = {
    "demo_model": "rackbench.demo model",
    "demo_dataset": "rackbench.demo dataset",
    "download_model": "rackbench.download",
    "prepare_dataset": "rackbench.dataset",
    "quantize": "rackbench.quantize",
    "build_engine": "rackbench.build_engine",
    "run_shard": "rackbench.harness",
    "accuracy": "rackbench.accuracy",
    "report": "rackbench.report",
}
# Fault injection (rackbench.atomic): every finished output waits this long
# before its rename, so a kill can land in the last moment of a step.
FAULT_PAUSE = {"RACKBENCH_FAULT_PAUSE_BEFORE_RENAME_S": "30"}
# Where a step writes atomically, when that is not its declared output itself
# (the demo dataset step writes its whole folder at once; the report writes its
# figures first and report.md last).
WRITTEN_AT = {"demo_dataset": "results/demo/source/dataset", "report": "results/report/shard_throughput.pdf"}


def _start(workdir, *args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, **LOCAL_SNAKEMAKE_ENV, **(env or {})},
    )


def _temp_siblings(path: Path):
    return list(path.parent.glob(f".{path.name}.tmp-*")) if path.parent.exists() else []


def _cwd(pid) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _job_pids(module, workdir):
    """PIDs of a step's job process (``python -m <module> ...``) running in ``workdir``."""
    pids = subprocess.run(["pgrep", "-f", f"python.* -m {module}"], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in pids if _cwd(pid) == str(workdir)]


def _kill_tree(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _shard_jsons(workdir, mode="performance"):
    runs = workdir / DEMO_RUN_DIR / mode
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(runs.glob("shard*/shard.json"))}


TIMING_COLUMNS = [
    "loadgen_tokens_per_second",
    "loadgen_samples_per_second",
    "loadgen_duration_s",
    "tokens_per_s",
    "tokens_per_s_per_gpu",
    "measured_tokens_per_s",
    "started_at",
    "finished_at",
    "last_completion",
    "wall_s",
    "overlap_fraction",
    "overlaps_all",
]


def _timing_free(report_csv):
    """The per-shard table without its timing columns (those legitimately differ run to run)."""
    frame = pd.read_csv(report_csv)
    assert set(TIMING_COLUMNS) <= set(frame.columns)
    return frame.drop(columns=TIMING_COLUMNS)


@pytest.mark.parametrize("rule", list(STEP_OUTPUTS))
def test_sigkill_mid_step_leaves_nothing_taken_as_done(demo_copy, rule):
    """SIGKILL Snakemake and the job together in the last moment of a step: its
    output fully written to the temporary path, not yet renamed. Nothing may be at
    the output path, and the next run must redo the step, never take it as done."""
    output = demo_copy / WRITTEN_AT.get(rule, STEP_OUTPUTS[rule])
    for path in {output, demo_copy / STEP_OUTPUTS[rule]}:  # the step must make them afresh
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    proc = _start(demo_copy, "--cores", "2", STEP_OUTPUTS[rule], env=FAULT_PAUSE)
    deadline = time.time() + 300
    while not _temp_siblings(output) or not _job_pids(STEP_MODULE[rule], demo_copy):
        assert proc.poll() is None, f"{rule} finished before it could be killed:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"{rule} never started writing"
        time.sleep(0.05)
    time.sleep(1.0)  # into the writing phase; the injected pause holds the rename back
    assert _job_pids(STEP_MODULE[rule], demo_copy), f"{rule}'s job was no longer running when killed"
    _kill_tree(proc)
    assert not (demo_copy / STEP_OUTPUTS[rule]).exists(), f"a killed {rule} left its output"

    snakemake(demo_copy, "--unlock")
    plan = snakemake(demo_copy, "-n", "--cores", "2", STEP_OUTPUTS[rule], check=False)
    planned_again = plan.returncode == 0 and f"rule {rule}:" in plan.stdout or f": {rule} " in plan.stdout
    flagged_incomplete = (
        "IncompleteFilesException" in plan.stdout + plan.stderr and STEP_OUTPUTS[rule] in plan.stdout + plan.stderr
    )
    assert planned_again or flagged_incomplete, plan.stdout[-3000:] + plan.stderr[-3000:]

    snakemake(demo_copy, "--cores", "2", "--rerun-incomplete", STEP_OUTPUTS[rule])
    assert (demo_copy / STEP_OUTPUTS[rule]).exists() and not _temp_siblings(output)


def _start_held_at_shard(demo_copy, output, *args):
    """``snakemake --cores 2 ARGS`` in the background, the shard ``output`` held by the injected
    pause before its rename; returns once the output's temporary sibling is there."""
    proc = _start(demo_copy, "--cores", "2", *args, env={**FAULT_PAUSE, "RACKBENCH_FAULT_PAUSE_ONLY": str(output)})
    deadline = time.time() + 300
    while not _temp_siblings(output):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    return proc


def test_killed_shard_is_retried(demo_copy):
    """The shard's own process dies (as a node failure would kill it); Snakemake retries it."""
    # the injected pause holds each shard at its rename, so the harness is still alive when killed
    output = demo_copy / STEP_OUTPUTS["run_shard"]
    # the performance shards as targets: with `--until run_shard` the accuracy shards, which wait
    # for them on a CPU host, stall Snakemake after the retry (its issue 823)
    targets = DEMO_CONFIGURATION.shard_dirs("performance")
    proc = _start_held_at_shard(demo_copy, output, "--retries", "1", "--forcerun", "run_shard", *targets)
    harness = [  # this copy's (cwd): other tests' demo runs, in other xdist workers, have the same shard0
        pid
        for pid in subprocess.run(
            ["pgrep", "-f", f"rackbench.harness .*--out {STEP_OUTPUTS['run_shard']}( |$)"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if _cwd(pid) == str(demo_copy)
    ]
    assert harness, "no harness process found for shard0"
    for pid in harness:
        os.kill(int(pid), signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "Trying to restart job" in out or "attempt: 2" in out or "retry" in out.lower(), out[-3000:]
    assert json.loads((output / "shard.json").read_text())["loadgen"]["result"] == "VALID"


def test_rerun_redoes_only_missing_shards(demo_copy):
    """As after a run whose shard 0 failed: that shard and the report are missing."""
    before = _shard_jsons(demo_copy)
    report_before = _timing_free(demo_copy / "results" / "report" / "shards.csv")
    shutil.rmtree(demo_copy / STEP_OUTPUTS["run_shard"])
    shutil.rmtree(demo_copy / "results" / "report")
    dry = snakemake(demo_copy, "-n", "--cores", "2").stdout
    assert "run_shard performance shard 0 " in dry
    assert "shard 1 " not in dry  # the surviving shard is not rerun
    assert "quantize" not in dry.split("Job stats:")[1]
    snakemake(demo_copy, "--cores", "2")
    after = _shard_jsons(demo_copy)
    assert after["shard1"] == before["shard1"]  # untouched
    assert after["shard0"]["output_tokens"] == before["shard0"]["output_tokens"]
    pd.testing.assert_frame_equal(_timing_free(demo_copy / "results" / "report" / "shards.csv"), report_before)


def test_broken_quantization_is_caught_by_the_accuracy_gate(demo_copy):
    """Corrupt the NVFP4 block scales of the checkpoint; the run must be INVALID and the
    report must not claim its throughput."""
    import torch
    from safetensors.torch import load_file, save_file

    checkpoint = demo_copy / STEP_OUTPUTS["quantize"]
    generator = torch.Generator().manual_seed(0)
    for shard in checkpoint.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, tensor in tensors.items():
            if name.endswith("weight_scale") and tensor.dtype == torch.float8_e4m3fn:
                noise = torch.randn(tensor.shape, generator=generator)  # random sign and size
                tensors[name] = (tensor.float() * noise).clamp(-448, 448).to(torch.float8_e4m3fn)
        save_file(tensors, shard, metadata={"format": "pt"})
    snakemake(demo_copy, "--cores", "2", "--forcerun", "build_engine")
    accuracy = json.loads((demo_copy / STEP_OUTPUTS["accuracy"]).read_text())
    assert accuracy["valid"] is False and accuracy["failures"]
    throughput = pd.read_csv(demo_copy / "results" / "report" / "throughput.csv")
    assert throughput["status"].tolist() == ["INVALID"]
    markdown = (demo_copy / "results" / "report" / "report.md").read_text()
    assert "INVALID" in markdown


def test_second_invocation_is_refused(demo_copy):
    # the injected pause keeps the first run's shards in flight while the others start, however slow the machine
    output = demo_copy / STEP_OUTPUTS["run_shard"]
    first = _start_held_at_shard(demo_copy, output, "--forcerun", "run_shard")
    # The same command again is refused: by Snakemake's lock on the working directory, or
    # (when a job of the first run has just renamed its output into place and is not yet
    # marked done) as incomplete output. With --rerun-incomplete, the lock refuses it.
    for extra in ([], ["--rerun-incomplete"]):
        again = snakemake(demo_copy, "--cores", "2", "--forcerun", "run_shard", *extra, check=False)
        said = again.stdout + again.stderr
        assert again.returncode != 0
        assert "LockException" in said or (not extra and "IncompleteFilesException" in said), said[-3000:]
        assert first.poll() is None, "the first run ended before the second was refused; the check proved nothing"
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    assert json.loads((demo_copy / STEP_OUTPUTS["accuracy"]).read_text())["valid"]


def _file_hashes(root: Path) -> dict[str, str]:
    from rackbench.atomic import sha256_file

    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


QUANTIZE_LOG = paths.log_file("quantize").format(
    model=DEMO_CONFIGURATION.model, recipe=DEMO_CONFIGURATION.recipe, variant=DEMO_CONFIGURATION.checkpoint_variant
)


def test_full_disk_stops_the_step_names_the_path_and_keeps_earlier_results(demo_copy, tmp_path):
    """Issue 14, item 4. results/ is a tmpfs with room for everything made so far and
    half of the quantized checkpoint; quantize (safetensors' writer, whose ENOSPC is no
    OSError) must stop with an error that says the disk is full and names the output,
    leave nothing at or beside its output, and change no earlier result. With room
    again, the same command makes it."""
    results = demo_copy / "results"
    target = STEP_OUTPUTS["quantize"]
    needed = _tree_bytes(demo_copy / target)
    saved = tmp_path / "results-before"
    shutil.move(results, saved)
    results.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(results)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        shutil.copytree(
            saved,
            results,
            symlinks=True,
            dirs_exist_ok=True,
            ignore=lambda d, names: [n for n in names if Path(d, n) == saved / Path(target).relative_to("results")],
        )
        assert not (demo_copy / target).exists()
        before = _file_hashes(results)
        room = shutil.disk_usage(results).used + needed // 2
        subprocess.run(["mount", "-o", f"remount,size={room // 4096 * 4096}", str(results)], check=True)
        assert shutil.disk_usage(results).free < needed

        full = snakemake(demo_copy, "--cores", "2", target, check=False)
        assert full.returncode != 0, full.stdout[-3000:]
        log = (demo_copy / QUANTIZE_LOG).read_text()
        assert "no space left on the filesystem of" in log and f"while writing {target}" in log, log[-3000:]
        assert not (demo_copy / target).exists() and not _temp_siblings(demo_copy / target)
        after = _file_hashes(results)
        after.pop(str(Path(QUANTIZE_LOG).relative_to("results")), None)
        before.pop(str(Path(QUANTIZE_LOG).relative_to("results")), None)
        assert after == before, "a full disk changed earlier results"

        subprocess.run(["mount", "-o", "remount,size=512m", str(results)], check=True)
        snakemake(demo_copy, "--cores", "2", target)
        assert (demo_copy / target / "config.json").exists() and not _temp_siblings(demo_copy / target)
    finally:
        subprocess.run(["umount", "-l", str(results)], capture_output=True)
