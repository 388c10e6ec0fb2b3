"""`snakemake --lint` on the real config (config/llama2-70b-gb300.yaml), as CI runs it.

The real config names MLPerf data that build machines do not have, so its dataset
paths are pointed at stand-in files first (conftest.real_config_with_local_data).
Exits with Snakemake's status; prints its findings.

    python tests/lint_real_config.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import ROOT, real_config_with_local_data, snakemake  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rackbench-lint-") as tmp:
        config = real_config_with_local_data(Path(tmp))
        proc = snakemake(ROOT, "--lint", "--configfile", str(config), timeout=300, check=False)
    print(proc.stdout + proc.stderr, end="")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
