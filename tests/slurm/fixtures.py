"""pytest fixtures for the real Slurm test cluster (tests/slurm/cluster.py).

Use from a test module or tests/conftest.py:

    from slurm.fixtures import slurm_cluster  # noqa: F401

``slurm_cluster`` starts the cluster once per session (reusing one that is
already running), skips with the reason if Slurm cannot be started here, and at
the end stops, by PID, only the daemons it started. Set RACKBENCH_SLURM_KEEP=1 to
leave them running for the next session.
"""

import os

import pytest

from slurm import cluster as _cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    try:
        c = _cluster.start(accounting=True)
    except _cluster.ClusterUnavailable as e:
        pytest.skip(f"no Slurm cluster here: {e}")
    yield c
    if c.started and not os.environ.get("RACKBENCH_SLURM_KEEP"):
        _cluster.stop(c.started)
