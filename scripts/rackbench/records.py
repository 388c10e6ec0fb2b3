"""Published Llama-2-70B records that the report compares against, each with its source and how far it is verified.

``status``:

* ``verified``: read here from the published LoadGen logs (the file is named in
  ``verified_from``; tests/test_records.py re-reads it through rackbench.ingest);
* ``unverified``: cited, but its logs could not be read here; ``note`` says what was
  found and what was not. An unverified record is never shown without the word;
* ``not an MLPerf result``: a sum of separate LoadGen runs (MLPerf accepts one LoadGen
  per system result), e.g. Azure's ~1.1M tokens/s on one GB300 NVL72.

What was checked for the v6.1 records (2026-12-01, the search/find_files/read_file tools
over the stored index of github.com/mlcommons/inference_results_v6.1; ``fetch`` of the
repository was refused): the index holds only README.md files of that repository, no
``mlperf_log_summary.txt``; so no v6.1 figure could be read, and each says what the index
does hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

VERIFIED = "verified"
UNVERIFIED = "unverified"
NOT_MLPERF = "not an MLPerf result"
SHARED_LOGS = "../shared/mlperf-logs"
X72 = (
    f"{SHARED_LOGS}/v6.0_NVIDIA_GB300-NVL72_x72_TRT_submission/closed/NVIDIA/results/"
    "GB300-NVL72_GB300-288GB_aarch64x72_TRT/llama2-70b-99"
)
V61 = "github.com/mlcommons/inference_results_v6.1"


@dataclass(frozen=True)
class Record:
    key: str
    submitter: str
    system: str
    gpu_type: str
    gpus: int
    round: str
    benchmark: str
    scenario: str
    tokens_per_s: float | None  # the system's figure (None where only a per-GPU figure is cited)
    per_gpu_cited: float | None  # a per-GPU figure as cited, where no total is known
    status: str
    source: str
    verified_from: str | None = None  # a LoadGen summary, relative to the project root
    printed: str | None = None  # LoadGen's figure exactly as printed there
    note: str = ""

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.gpus if self.tokens_per_s is not None else float(self.per_gpu_cited)

    def short_label(self) -> str:
        """For figures and table cells: submitter, round and status (e.g. "NVIDIA v6.0", "Azure, unverified")."""
        return f"{self.submitter} {self.round}" + ("" if self.status == VERIFIED else f", {self.status}")

    def label(self) -> str:
        tag = "" if self.status == VERIFIED else f" ({self.status})"
        return f"{self.submitter} {self.system} {self.round} {self.benchmark} {self.scenario}{tag}"


def _nvidia_gb300_x72(scenario: str, tokens_per_s: float, printed: str, source="as above", note="") -> Record:
    """A scenario of NVIDIA's v6.0 GB300 NVL72 submission, read from its LoadGen summary."""
    return Record(
        f"nvidia-gb300-x72-v6.0-{scenario.lower()}",
        "NVIDIA",
        "GB300 NVL72 (72x GB300, one LoadGen)",
        "GB300",
        72,
        "v6.0",
        "llama2-70b-99",
        scenario,
        tokens_per_s,
        None,
        VERIFIED,
        source,
        f"{X72}/{scenario}/performance/run_1/mlperf_log_summary.txt",
        printed,
        note,
    )


RECORDS = (
    _nvidia_gb300_x72(
        "Offline",
        1126850.0,
        "1.12685e+06",
        source="MLPerf Inference v6.0 closed, NVIDIA GB300-NVL72_GB300-288GB_aarch64x72_TRT (fork gbeezybez/"
        "inference_results_v6.0 at 232fbf9 of mlcommons' v6.0 results)",
        note="MLCommons' checker accepts the tree (tests/test_mlcommons.py)",
    ),
    _nvidia_gb300_x72("Server", 868277.92, "868277.92"),
    _nvidia_gb300_x72("Interactive", 814127.85, "814127.85"),
    Record(
        "coreweave-nvl72-v6.1-offline",
        "CoreWeave",
        "NVL72 x72 (one LoadGen)",
        "GB300",
        72,
        "v6.1",
        "llama2-70b-99.9",
        "Offline",
        1136100.0,
        None,
        UNVERIFIED,
        f"{V61}, closed/CoreWeave (as cited in issue 13)",
        note="not read here: the stored index of the v6.1 results holds for CoreWeave's llama2-70b-99.9 only "
        "closed/CoreWeave/results/GB200-NVL72_GB200-186GB_aarch64x72_TRT/llama2-70b-99.9/Offline/README.md "
        "(a GB200 system name, not GB300) and no LoadGen log; the GPU type GB300 is as cited",
    ),
    Record(
        "oracle-gb300-v6.1-best-per-gpu",
        "Oracle",
        "GB300 (best GB300 per GPU in v6.1, as cited)",
        "GB300",
        1,
        "v6.1",
        "llama2-70b-99.9",
        "Offline",
        None,
        16532.0,
        UNVERIFIED,
        f"{V61}, closed/Oracle (as cited in issue 13)",
        note="not read here: the stored index lists no Oracle GB300 llama2-70b result folder (only MI355X and "
        "B300 folders of other benchmarks), so neither the figure nor the system could be checked",
    ),
    Record(
        "amd-mi355x-x8-v6.1-offline",
        "AMD",
        "8xMI355X_2xEPYC_9575F",
        "MI355X",
        8,
        "v6.1",
        "llama2-70b-99.9",
        "Offline",
        None,
        13315.0,
        UNVERIFIED,
        f"{V61}, closed/AMD/results/8xMI355X_2xEPYC_9575F/llama2-70b-99.9/Offline",
        note="the result folder exists in the stored index (README.md only); its mlperf_log_summary.txt could "
        "not be read here, so the per-GPU figure is as cited",
    ),
    Record(
        "azure-gb300-nvl72-sum",
        "Microsoft Azure",
        "ND GB300 v6, one NVL72 rack (18 VMs)",
        "GB300",
        72,
        "v5.1",
        "llama2-70b-99",
        "Offline",
        1100000.0,
        None,
        NOT_MLPERF,
        "Azure ND GB300 v6 announcement (~1.1M tokens/s)",
        note="an unverified sum of 18 separate per-VM LoadGen runs; MLPerf accepts one LoadGen per system result, "
        "so this is not an MLPerf result",
    ),
    Record(
        "nvidia-h100-x8-v4.1-offline",
        "NVIDIA",
        "DGX-H100_H100-SXM-80GBx8_TRT",
        "H100",
        8,
        "v4.1",
        "llama2-70b-99",
        "Offline",
        24524.9,
        None,
        VERIFIED,
        "MLPerf Inference v4.1 closed, NVIDIA",
        f"{SHARED_LOGS}/v4.1_NVIDIA_DGX-H100_H100-SXM-80GBx8_TRT/llama2-70b-99/Offline/performance/run_1/"
        "mlperf_log_summary.txt",
        "24524.9",
    ),
    Record(
        "nvidia-b200-x8-v5.1-offline",
        "NVIDIA",
        "B200-SXM-180GBx8_TRT",
        "B200",
        8,
        "v5.1",
        "llama2-70b-99",
        "Offline",
        101527.0,
        None,
        VERIFIED,
        "MLPerf Inference v5.1 closed, NVIDIA",
        f"{SHARED_LOGS}/v5.1_NVIDIA_B200-SXM-180GBx8_TRT/llama2-70b-99/Offline/performance/run_1/"
        "mlperf_log_summary.txt",
        "101527",
    ),
    Record(
        "nvidia-gb200-x4-v5.1-offline",
        "NVIDIA",
        "GB200-NVL72_GB200-186GB_aarch64x4_TRT",
        "GB200",
        4,
        "v5.1",
        "llama2-70b-99",
        "Offline",
        51736.9,
        None,
        VERIFIED,
        "MLPerf Inference v5.1 closed, NVIDIA",
        f"{SHARED_LOGS}/v5.1_NVIDIA_GB200-NVL72_GB200-186GB_aarch64x4_TRT/llama2-70b-99/Offline/performance/run_1/"
        "mlperf_log_summary.txt",
        "51736.9",
    ),
    Record(
        "h200-best-v5.1-offline",
        "(best H200 submission)",
        "H200 x8",
        "H200",
        1,
        "v5.1",
        "llama2-70b-99",
        "Offline",
        None,
        4415.0,
        UNVERIFIED,
        "MLPerf Inference v5.1, best H200 llama2-70b Offline result / GPUs",
        note="carried over from rackbench's earlier table; no H200 log is in ../shared/mlperf-logs",
    ),
)
_STATUS_ORDER = {VERIFIED: 0, UNVERIFIED: 1, NOT_MLPERF: 2}


def comparison_record(gpu_type: str, scenario: str = "Offline") -> Record | None:
    """The record a configuration on ``gpu_type`` is compared with: the best verified one, else the best
    unverified, else a non-MLPerf figure (each labelled as what it is)."""
    candidates = [r for r in RECORDS if r.gpu_type == gpu_type and r.scenario == scenario]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (_STATUS_ORDER[r.status], -r.tokens_per_s_per_gpu))


def by_gpu_type(scenario: str = "Offline") -> dict:
    """``{gpu_type: {tokens_per_s_per_gpu, source}}``: the shape report.published_records uses."""
    out = {}
    for gpu in sorted({r.gpu_type for r in RECORDS}):
        rec = comparison_record(gpu, scenario)
        if rec is not None:
            out[gpu] = {
                "tokens_per_s_per_gpu": round(rec.tokens_per_s_per_gpu),
                "source": rec.short_label(),
                "status": rec.status,
                "key": rec.key,
            }
    return out


def as_rows() -> list[dict]:
    return [{**asdict(r), "tokens_per_s_per_gpu": r.tokens_per_s_per_gpu} for r in RECORDS]


def markdown_section() -> str:
    """The report's table of current records, with sources and verification status."""
    lines = [
        "## Current Llama-2-70B records",
        "",
        "Each with its source. *verified*: read from the published LoadGen log named; *unverified*: cited, "
        "logs not readable here (see note); *not an MLPerf result*: a sum of separate LoadGen runs.",
        "",
        "| record | GPUs | scenario | tokens/s | per GPU | status | source | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RECORDS:
        total = (
            "-"
            if r.tokens_per_s is None
            else (
                f"{r.printed} (= {r.tokens_per_s:,.0f})"
                if r.printed and r.printed != f"{r.tokens_per_s:,.0f}"
                else f"{r.tokens_per_s:,.0f}"
            )
        )
        src = r.source + (f"; log: `{r.verified_from}`" if r.verified_from else "")
        lines.append(
            f"| {r.submitter} {r.system} ({r.round}, {r.benchmark}) | {r.gpus if r.tokens_per_s else '-'} | "
            f"{r.scenario} | {total} | {r.tokens_per_s_per_gpu:,.0f} | {r.status} | {src} | {r.note or '-'} |"
        )
    return "\n".join(lines) + "\n"
