"""How every TensorRT-LLM process on a GPU node is started: through ``trtllm-llmapi-launch``.

A single-GPU ``tensorrt_llm.LLM`` starts its executor worker with MPI spawn
(``MpiPoolSession``, tensorrt_llm/executor/), which fails inside Slurm/PMIx job steps.
TensorRT-LLM ships ``trtllm-llmapi-launch`` (tensorrt_llm/llmapi/trtllm-llmapi-launch,
installed on PATH by its setup.py) for exactly this case: it takes the whole command line
after it, runs it on rank 0 with the MPI/Slurm variables removed from its environment,
and serves the MPI world next to it (``tensorrt_llm.llmapi.mgmn_leader_node``; other ranks
run ``mgmn_worker_node``). The Slurm step must have tp x pp tasks (the model's world size).
The facts are in ``rackbench/contracts/trtllm_1_2.yaml`` (``llmapi_launch``).

API (for rules, build_engine's warm-up and the ``trtllm-serve`` launch builders):

* ``launch_prefix(backend)`` -> ``"trtllm-llmapi-launch "`` for ``tensorrt-llm``, ``""`` otherwise:
  a shell prefix for a rule's command line (``"{params.launch}python -m rackbench.harness ..."``).
* ``launch_command(argv)`` -> ``["trtllm-llmapi-launch", *argv]`` for an argv list
  (e.g. ``launch_command(["trtllm-serve", model_dir, "--port", "8000", ...])``).
* ``slurm_tasks(settings)`` -> the number of Slurm tasks such a step needs (tp x pp).

The launcher is used wherever the job runs, not only under Slurm: without Slurm or MPI
variables it is rank 0 of a world of one (``mpi_world_size`` falls back to 1), which is
what TensorRT-LLM's own single-node tests run.
"""

from __future__ import annotations

from rackbench.trtllm_options import trtllm_contract

TRTLLM_BACKEND = "tensorrt-llm"


def launcher() -> str:
    """The launcher's executable name, from the contract data."""
    return trtllm_contract()["llmapi_launch"]["executable"]


def launch_command(argv: list[str]) -> list[str]:
    """``argv`` run through ``trtllm-llmapi-launch`` (the launcher takes the whole command after it)."""
    if not argv:
        raise ValueError("launch_command needs the command to launch")
    if argv[0] == launcher():
        return list(argv)  # already wrapped: a second launcher would start a second MPI proxy
    return [launcher(), *map(str, argv)]


def launch_prefix(backend: str) -> str:
    """Shell prefix for a job of ``backend``: the launcher for TensorRT-LLM, nothing otherwise."""
    return f"{launcher()} " if backend == TRTLLM_BACKEND else ""


def slurm_tasks(settings: dict | None) -> int:
    """Slurm tasks for one TensorRT-LLM process group: the model world size tp x pp."""
    settings = settings or {}
    return int(settings.get("tensor_parallel_size", 1)) * int(settings.get("pipeline_parallel_size", 1))
