"""pytest fixtures for the real Slurm test cluster (tests/slurm/cluster.py).

Use from a test module or tests/conftest.py:

    from slurm.fixtures import slurm_cluster  # noqa: F401

``slurm_cluster`` starts the cluster once per session (reusing one that is
already running), skips with the reason if Slurm cannot be started here, and at
the end stops, by PID, every daemon this test process started (also on SIGTERM,
SIGHUP and at exit: cluster.stop_at_exit). Set RACKBENCH_SLURM_KEEP=1 to leave them
running for the next session.
"""

import os

import pytest

from slurm import cluster as _cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    keep = os.environ.get("RACKBENCH_SLURM_KEEP")
    if not keep:
        _cluster.stop_at_exit()  # also when the session is killed with SIGTERM or SIGHUP
    try:
        c = _cluster.start(accounting=True)
    except _cluster.ClusterUnavailable as e:
        pytest.skip(f"no Slurm cluster here: {e}")
    yield c
    if not keep:
        # Everything this process started, not only c.started: each test module that
        # imports this fixture gets its own instance, and a test may restart daemons.
        _cluster.stop(_cluster.started_here())
