"""envs/trtllm.def: LoadGen built from source at image build time (aarch64 has no wheel).

The def runs envs/build_loadgen.sh; the slow test runs that same script here, building
mlcommons-loadgen 6.0.17 from its PyPI sdist with the tools the script provides, and imports
the result. The cheap tests check the def really runs it, and the failure path names what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEF = ROOT / "envs" / "trtllm.def"
SCRIPT = ROOT / "envs" / "build_loadgen.sh"


def _section(text: str, name: str) -> str:
    part = text.split(f"%{name}\n", 1)[1]
    return part.split("\n%", 1)[0]


def test_def_builds_loadgen_with_the_script_and_uses_trtllm_1_2_1():
    text = DEF.read_text()
    assert "From: nvcr.io/nvidia/tensorrt-llm/release:1.2.1" in text
    assert "envs/build_loadgen.sh /opt/rackbench/envs/build_loadgen.sh" in _section(text, "files")
    post = _section(text, "post")
    assert "bash /opt/rackbench/envs/build_loadgen.sh" in post
    assert "mlcommons-loadgen" not in post.replace("build_loadgen", "")  # not pip-installed a second way
    assert post.index("set -eu") < post.index("build_loadgen.sh")  # a failed build stops the image build
    script = SCRIPT.read_text()
    for step in (
        "pybind11==2.11.1",
        "g++ -std=c++14",
        "Python.h",
        "--no-build-isolation",
        "--no-binary mlcommons-loadgen",
    ):
        assert step in script, step


def test_missing_compiler_fails_with_a_clear_message(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "mktemp", "rm", "ls", "head", "cat", "dirname"):  # everything but a compiler
        path = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if path:
            (bin_dir / tool).symlink_to(path)
    env = {"PATH": str(bin_dir), "LOADGEN_NO_APT": "1", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "cannot build mlcommons-loadgen 6.0.17 from source: no C++ compiler: install g++" in proc.stderr


@pytest.mark.slow
def test_loadgen_sdist_builds_here_from_source_with_the_scripts_tools(tmp_path):
    sdist_dir = tmp_path / "sdist"
    got = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(sdist_dir),
            "mlcommons-loadgen==6.0.17",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if got.returncode:
        pytest.skip(f"cannot fetch the mlcommons-loadgen sdist from PyPI: {got.stderr.strip()[-300:]}")
    sdist = next(sdist_dir.glob("mlcommons_loadgen-6.0.17.tar.gz"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "LOADGEN_SDIST": str(sdist),
        "LOADGEN_WHEEL_ONLY": "1",
        "LOADGEN_WHEEL_DIR": str(wheels),
        "LOADGEN_NO_APT": "1",
    }
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheel = next(wheels.glob("mlcommons_loadgen-6.0.17-*.whl"))
    assert "none-any" not in wheel.name  # a compiled extension, built here
    target = tmp_path / "installed"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    code = (
        "import mlperf_loadgen as lg; s = lg.TestSettings(); s.scenario = lg.TestScenario.Offline; print(lg.__file__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(str(target))
