"""MLPerf compliance TEST06 (llama2-70b output consistency), run with MLCommons' own files.

TEST06 (``compliance/TEST06/README.md`` of mlcommons/inference) has two parts:

1. run the benchmark in performance mode with TEST06's ``audit.config`` in the
   directory the benchmark runs from (LoadGen reads ``audit.config`` from its
   working directory: ``StartTestWithLogSettings(..., audit_config_filename=
   "audit.config")``). The audit settings log ~100 samples' outputs to
   ``mlperf_log_accuracy.json`` and turn off equal-issue mode;
2. run ``run_verification.py -c COMPLIANCE_DIR -o OUTPUT_DIR -s SCENARIO``, which
   writes ``OUTPUT_DIR/TEST06/verify_accuracy.txt`` (its three checks: first token,
   EOS, sample length) and copies the accuracy log to ``OUTPUT_DIR/TEST06/accuracy/``,
   exactly the ``TEST06/`` folder a submission tree holds.

Both files come from the user's checkout of mlcommons/inference (config
``mlcommons.inference_dir``); nothing of them is copied into rackbench.

``python -m rackbench.compliance test06 --inference-dir D --scenario Offline --run-dir R
--out O -- <rackbench.harness arguments without --out/--mode>`` does both parts;
``python -m rackbench.compliance verify --inference-dir D --compliance-dir C --out O
--scenario S`` only the second (e.g. on published TEST06 logs).

One known quirk of ``run_verification.py`` (b66003e): ``--eos_token_id`` has no
``type=int``, so a value given on its command line is a string and its EOS check
then compares token ids with a string and cannot fail. rackbench therefore leaves the
option at the script's default (2, Llama-2's ``</s>``) when the model's EOS id is 2;
for any other EOS id it also calls the script's own ``eos_check`` function with the
integer id, and records both results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rackbench.atomic import atomic_path, write_json_atomic

TEST06 = "TEST06"
TEST06_DIR = Path("compliance") / TEST06
AUDIT_CONFIG = "audit.config"
VERIFY_SCRIPT = "run_verification.py"
VERIFY_OUTPUT = "verify_accuracy.txt"
SCRIPT_DEFAULT_EOS = 2  # run_verification.py: --eos_token_id default=2
CHECKS = ("first_token", "eos", "sample_length")
CHECK_TITLES = {
    "first_token": "First token check pass",
    "eos": "EOS check pass",
    "sample_length": "Sample length check pass",
}
# files of a checkout that rackbench runs (one place: used by checkout() and the checker module)
CHECKOUT_FILES = (
    TEST06_DIR / AUDIT_CONFIG,
    TEST06_DIR / VERIFY_SCRIPT,
    Path("tools/submission/submission_checker/main.py"),
    Path("language/llama2-70b/evaluate-accuracy.py"),
)


class ComplianceError(RuntimeError):
    pass


def checkout(path) -> Path:
    """The mlcommons/inference checkout at ``path``, checked for the files rackbench runs."""
    if path in (None, ""):
        raise ComplianceError(
            "no mlcommons/inference checkout configured: set mlcommons.inference_dir "
            "to your clone of https://github.com/mlcommons/inference"
        )
    root = Path(path).resolve()
    missing = [str(f) for f in CHECKOUT_FILES if not (root / f).is_file()]
    if missing:
        raise ComplianceError(f"{root} is not an mlcommons/inference checkout: missing {', '.join(missing)}")
    return root


def configured_checkout(configured, basedir) -> tuple[str | None, str | None]:
    """(the checkout's absolute path, None), or (None, why TEST06 and the checker do not run),
    for config ``mlcommons.inference_dir`` = ``configured`` (relative to ``basedir``, the
    workflow's folder). The why names the checkout as configured, not by its absolute path, so
    a report is the same wherever the workflow lives."""
    if configured is None:
        return None, (
            "mlcommons.inference_dir is null, so TEST06, the submission tree and MLCommons' submission "
            "checker were not run (set it to your clone of https://github.com/mlcommons/inference)"
        )
    path = Path(configured)
    if not path.is_absolute():
        path = Path(basedir) / path
    try:
        return str(checkout(path)), None
    except ComplianceError as err:
        why = str(err).replace(str(path.resolve()), str(configured)).replace(str(path), str(configured))
        return None, f"mlcommons.inference_dir {configured!r}: {why}; TEST06 and the checker were not run"


def audit_config(inference_dir) -> Path:
    """TEST06's audit.config in the checkout: a LoadGen run under it is TEST06's part 1."""
    return checkout(inference_dir) / TEST06_DIR / AUDIT_CONFIG


def checkout_revision(root) -> str | None:
    """The checkout's git commit where it is a git clone (None for an unpacked copy)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# --------------------------------------------------------------------------- part 2: verification


def parse_verify_accuracy(text: str) -> dict:
    """``verify_accuracy.txt`` -> {first_token, eos, sample_length: True/False/"Skipped"/None, passed, lines}."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out: dict = {"lines": lines}
    for key, title in CHECK_TITLES.items():
        value = None
        for line in lines:
            match = re.fullmatch(re.escape(title) + r":\s*(\S+)", line)
            if match:
                value = {"True": True, "False": False}.get(match.group(1), match.group(1))
        out[key] = value
    complete = "TEST06 verification complete" in lines
    # the same reading as the submission checker (checks/compliance_check.py): first token may be Skipped
    checks_pass = out["first_token"] in (True, "Skipped") and out["eos"] is True and out["sample_length"] is True
    out["passed"] = bool(complete and checks_pass)
    return out


def _eos_check_with_int(root: Path, accuracy_log: Path, eos_token_id: int, dtype: str) -> bool:
    """run_verification.py's own eos_check, called with an integer EOS id (see the module docstring)."""
    code = (
        "import json, sys, numpy as np; sys.path.insert(0, sys.argv[1]); import run_verification as rv; "
        "data = json.load(open(sys.argv[2])); "
        "print(rv.eos_check(data, rv.DTYPE_MAP[sys.argv[4]], int(sys.argv[3])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(root / TEST06_DIR), str(accuracy_log), str(eos_token_id), dtype],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise ComplianceError(f"run_verification.eos_check failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip().splitlines()[-1] == "True"


def verify(
    inference_dir,
    compliance_dir,
    output_dir,
    scenario: str,
    *,
    eos_token_id: int = SCRIPT_DEFAULT_EOS,
    dtype: str = "int32",
) -> dict:
    """Run TEST06's ``run_verification.py`` on a TEST06 run's logs; returns its parsed checks.

    Writes ``output_dir/TEST06/{verify_accuracy.txt, accuracy/mlperf_log_accuracy.json}``
    (the script's own outputs) and ``output_dir/TEST06/rackbench_test06.json``.
    """
    root = checkout(inference_dir)
    compliance_dir, output_dir = Path(compliance_dir), Path(output_dir)
    accuracy_log = compliance_dir / "mlperf_log_accuracy.json"
    if not accuracy_log.is_file():
        raise ComplianceError(f"{accuracy_log} is missing: TEST06 needs the run's accuracy log")
    command = [
        sys.executable,
        str(root / TEST06_DIR / VERIFY_SCRIPT),
        "-c",
        str(compliance_dir),
        "-o",
        str(output_dir),
        "-s",
        scenario,
        "--dtype",
        dtype,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    verify_txt = output_dir / TEST06 / VERIFY_OUTPUT
    if proc.returncode != 0 or not verify_txt.is_file():
        raise ComplianceError(f"{VERIFY_SCRIPT} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    result = parse_verify_accuracy(verify_txt.read_text())
    result.update(
        {
            "test": TEST06,
            "scenario": scenario,
            "compliance_dir": str(compliance_dir),
            "verify_accuracy": str(verify_txt),
            "command": command,
            "stdout": proc.stdout,
            "inference_dir": str(root),
            "inference_revision": checkout_revision(root),
            "eos_token_id": eos_token_id,
            "dtype": dtype,
            "accuracy_log_entries": _count_entries(accuracy_log),
        }
    )
    if eos_token_id != SCRIPT_DEFAULT_EOS:
        result["eos_with_model_eos"] = _eos_check_with_int(root, accuracy_log, eos_token_id, dtype)
        result["eos_note"] = (
            f"the script checks EOS id {SCRIPT_DEFAULT_EOS} (its default); this model's EOS "
            f"is {eos_token_id}: its eos_check with {eos_token_id} says "
            f"{result['eos_with_model_eos']}"
        )
        result["passed"] = bool(result["passed"] and result["eos_with_model_eos"])
    write_json_atomic(output_dir / TEST06 / "rackbench_test06.json", {k: v for k, v in result.items() if k != "stdout"})
    return result


def _count_entries(accuracy_log: Path) -> int:
    with open(accuracy_log) as handle:
        return len(json.load(handle))


# --------------------------------------------------------------------------- part 1: the run


def audit_config_read(detail_log) -> bool:
    """Whether LoadGen applied an audit.config (TEST06's README: "check that loadgen has found
    audit.config in mlperf_log_detail.txt"): LoadGen 6.x logs "Found Audit Config file (audit.config)"."""
    text = Path(detail_log).read_text(errors="replace")
    return f"Found Audit Config file ({AUDIT_CONFIG})" in text


# harness options that name files: made absolute, since the harness runs in the run directory
HARNESS_PATH_OPTIONS = ("--engine-dir", "--dataset")


def _absolute_paths(args: list[str]) -> list[str]:
    out = list(args)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name in HARNESS_PATH_OPTIONS and eq:
            out[i] = f"{name}={os.path.abspath(value)}"
        elif arg in HARNESS_PATH_OPTIONS and i + 1 < len(out):
            out[i + 1] = os.path.abspath(out[i + 1])
    return out


def harness_command(harness_args: list[str], loadgen_out: Path) -> list[str]:
    forbidden = {"--out", "--mode"} & set(harness_args)
    if forbidden:
        raise ComplianceError(
            f"harness arguments must not set {', '.join(sorted(forbidden))}: TEST06 runs in "
            "performance mode and writes into its own run directory"
        )
    return [
        sys.executable,
        "-m",
        "rackbench.harness",
        *_absolute_paths(harness_args),
        "--mode",
        "performance",
        "--out",
        str(loadgen_out),
    ]


def run_test06(
    inference_dir,
    *,
    scenario: str,
    run_dir,
    out_dir,
    harness_args: list[str],
    eos_token_id: int = SCRIPT_DEFAULT_EOS,
    dtype: str = "int32",
    env: dict | None = None,
) -> dict:
    """Part 1 (the harness in ``run_dir`` with TEST06's audit.config) then part 2; returns the checks.

    ``run_dir`` keeps the audit.config, the LoadGen logs (``run_dir/loadgen``) and the harness log;
    ``out_dir`` receives ``TEST06/`` as a submission tree holds it. Written atomically.
    """
    root = checkout(inference_dir)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    with atomic_path(run_dir, directory=True) as tmp_run:
        shutil.copy2(audit_config(root), tmp_run / AUDIT_CONFIG)
        command = harness_command(harness_args, (tmp_run / "loadgen").resolve())
        with open(tmp_run / "harness.log", "w") as log:
            proc = subprocess.run(
                command,
                cwd=tmp_run,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                timeout=None,
            )
        if proc.returncode != 0:
            tail = (tmp_run / "harness.log").read_text(errors="replace")[-3000:]
            raise ComplianceError(f"TEST06 harness run failed ({proc.returncode}):\n{tail}")
        detail = tmp_run / "loadgen" / "mlperf_log_detail.txt"
        if not audit_config_read(detail):
            raise ComplianceError(f"{detail}: LoadGen did not apply TEST06's audit.config")
    with atomic_path(out_dir, directory=True) as tmp_out:
        result = verify(root, run_dir / "loadgen", tmp_out, scenario, eos_token_id=eos_token_id, dtype=dtype)
    result["audit_config_read"] = True
    result["run_dir"] = str(run_dir)
    result["verify_accuracy"] = str(out_dir / TEST06 / VERIFY_OUTPUT)
    return result


def read_result(test06_dir) -> dict:
    """A finished ``TEST06/`` folder (ours or published) -> parsed checks (+ rackbench's JSON when present)."""
    test06_dir = Path(test06_dir)
    result = parse_verify_accuracy((test06_dir / VERIFY_OUTPUT).read_text())
    extra = test06_dir / "rackbench_test06.json"
    if extra.is_file():
        saved = json.loads(extra.read_text())
        for key in (
            "scenario",
            "inference_revision",
            "eos_token_id",
            "eos_with_model_eos",
            "eos_note",
            "accuracy_log_entries",
        ):
            if key in saved:
                result[key] = saved[key]
        if "eos_with_model_eos" in saved:
            result["passed"] = bool(result["passed"] and saved["eos_with_model_eos"])
    result["dir"] = str(test06_dir)
    return result


# --------------------------------------------------------------------------- report


def _cell(value) -> str:
    return (
        {True: "pass", False: "**FAIL**", None: "-"}.get(value, str(value))
        if not isinstance(value, str)
        else value.lower()
    )


def markdown_section(results: dict[str, dict]) -> str:
    """``{label: result}`` (label = configuration/scenario) -> the report's TEST06 section."""
    lines = [
        "## MLPerf compliance: TEST06",
        "",
        "MLCommons' `compliance/TEST06`: LoadGen run with TEST06's `audit.config`, then "
        "`run_verification.py`. First token is skipped in Offline (no first token is reported).",
        "",
    ]
    if not results:
        return "\n".join(lines + ["No TEST06 results.", ""])
    lines += [
        "| configuration / scenario | first token | EOS | sample length | verdict | samples checked |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for label, r in sorted(results.items()):
        lines.append(
            f"| {label} | {_cell(r.get('first_token'))} | {_cell(r.get('eos'))} | "
            f"{_cell(r.get('sample_length'))} | {'PASS' if r.get('passed') else '**FAIL**'} | "
            f"{r.get('accuracy_log_entries', '-')} |"
        )
        if r.get("eos_note"):
            notes.append(f"- {label}: {r['eos_note']}")
    return "\n".join(lines + ([""] + notes if notes else []) + [""])


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rackbench.compliance", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("test06", "verify"):
        s = sub.add_parser(name)
        s.add_argument("--inference-dir", required=True, help="mlcommons/inference checkout (mlcommons.inference_dir)")
        s.add_argument("--scenario", required=True, choices=["Offline", "Server", "Interactive"])
        s.add_argument("--out", required=True, help="folder that receives TEST06/ (the submission tree's scenario dir)")
        s.add_argument("--eos-token-id", type=int, default=SCRIPT_DEFAULT_EOS)
        s.add_argument("--dtype", default="int32", help="token id dtype of the accuracy log (the harness: int32)")
        if name == "test06":
            s.add_argument(
                "--run-dir", required=True, help="working dir of the run (gets audit.config and LoadGen logs)"
            )
            s.add_argument(
                "harness_args",
                nargs=argparse.REMAINDER,
                help="after --: rackbench.harness arguments (not --out/--mode)",
            )
        else:
            s.add_argument(
                "--compliance-dir", required=True, help="folder with the TEST06 run's mlperf_log_accuracy.json"
            )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "test06":
            harness_args = args.harness_args[1:] if args.harness_args[:1] == ["--"] else args.harness_args
            result = run_test06(
                args.inference_dir,
                scenario=args.scenario,
                run_dir=args.run_dir,
                out_dir=args.out,
                harness_args=harness_args,
                eos_token_id=args.eos_token_id,
                dtype=args.dtype,
            )
        else:
            result = verify(
                args.inference_dir,
                args.compliance_dir,
                args.out,
                args.scenario,
                eos_token_id=args.eos_token_id,
                dtype=args.dtype,
            )
    except ComplianceError as err:
        print(f"TEST06: {err}", file=sys.stderr)
        return 2
    print("\n".join(result["lines"]))
    if result.get("eos_note"):
        print(result["eos_note"])
    print(f"TEST06 {'PASS' if result['passed'] else 'FAIL'}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
