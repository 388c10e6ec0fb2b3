"""`snakemake --report` on a tiny standalone workflow whose report rule is the one
handed to the lead (report() outputs with captions in categories throughput,
accuracy, provenance); the HTML is opened in headless Chromium, which must render
the figures. Independent of the demo run."""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import snakemake

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SNAKEFILE = """
SHARDS = expand("results/runs/llama2-70b/nvfp4/tensorrt-llm/GB300/bs16/2x4/{VARIANT}/performance/shard{i}", i=range(2))
ACC = ["results/accuracy/llama2-70b/nvfp4/tensorrt-llm/GB300/bs16/2x4/{VARIANT}/accuracy.json"]
R = "results/report"
FIGS = ["shard_throughput", "shard_timeline", "records", "efficiency"]

rule all:
    default_target: True
    input: "results/report/report.md", "results/accuracy_shown.json"

rule report:
    input: shards=SHARDS, accuracy=ACC
    output:
        throughput=report(f"{R}/throughput.csv", caption="report/throughput.rst", category="throughput"),
        shards=report(f"{R}/shards.csv", caption="report/shards.rst", category="throughput"),
        md=report(f"{R}/report.md", caption="report/report_md.rst", category="throughput"),
        provenance=report(f"{R}/provenance.csv", caption="report/provenance.rst", category="provenance"),
        shard_throughput=report(multiext(f"{R}/shard_throughput", ".pdf", ".svg", ".png"),
                                caption="report/shard_throughput.rst", category="throughput"),
        shard_timeline=report(multiext(f"{R}/shard_timeline", ".pdf", ".svg", ".png"),
                              caption="report/shard_timeline.rst", category="throughput"),
        records=report(multiext(f"{R}/records", ".pdf", ".svg", ".png"),
                       caption="report/records.rst", category="throughput"),
        efficiency=report(multiext(f"{R}/efficiency", ".pdf", ".svg", ".png"),
                          caption="report/efficiency.rst", category="throughput"),
    shell:
        "{PY} -m rackbench.report --configurations-json configurations.json "
        "--gpu-types-json gpu_types.json --models-json models.json --out " + R

rule accuracy_shown:
    input: ACC
    output: report("results/accuracy_shown.json", caption="report/accuracy.rst", category="accuracy")
    shell: "cp {input} {output}"
""".replace("{PY}", sys.executable)

PROBE = """<script>
(function(){
const targets = TARGETS;
const found = {};
function clickText(sel, text){for(const a of document.querySelectorAll(sel)){if(a.textContent.trim()===text){a.click();return true;}}return false;}
function show(i){
  if(i>=targets.length){const pre=document.createElement('pre');pre.id='rb-result';pre.textContent=JSON.stringify(found);document.body.appendChild(pre);return;}
  const name=targets[i]; let ok=false;
  for(const td of document.querySelectorAll('td')){if(td.textContent.trim()===name){const eye=td.parentElement.querySelector('a[iconname="eye"]');if(eye){eye.click();ok=true;}break;}}
  setTimeout(()=>{
    const imgs=[...document.querySelectorAll('img')].filter(e=>!(e.src||'').includes('logo.svg'));
    found[name]={clicked:ok, media:imgs.map(e=>({src:(e.src||'').slice(0,30), w:e.naturalWidth, h:e.naturalHeight, complete:e.complete}))};
    clickText('a,button','throughput');
    setTimeout(()=>show(i+1),800);
  },1500);
}
window.addEventListener('load',()=>{setTimeout(()=>{clickText('a,button','throughput');setTimeout(()=>show(0),1500);},1500);});
})();
</script></body>"""


def test_snakemake_report_renders_figures_in_chromium(tmp_path, chromium):
    spec = importlib.util.spec_from_file_location("aggregate_rack", REPO / "bench" / "aggregate_rack.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for i in range(2):
        bench.write_shard(tmp_path / "results", shard=i, num_shards=2, rows=20, started_at=1.7e9 + i, duration=50.0)
    acc = bench.write_accuracy(tmp_path / "results", layout="2x4")
    dirs = sorted((tmp_path / "results" / "runs").glob("*/*/*/*/*/*/*/performance/shard*"))
    entry = {
        **bench.configuration_entry(dirs, acc),
        "accuracy_json": str(acc.relative_to(tmp_path)),
        "shard_dirs": [str(d.relative_to(tmp_path)) for d in dirs],
    }  # paths as the rule passes them
    (tmp_path / "configurations.json").write_text(json.dumps([entry]))
    (tmp_path / "gpu_types.json").write_text(json.dumps(bench.GPU_TYPES))
    (tmp_path / "models.json").write_text(json.dumps(bench.MODELS))
    shutil.copytree(REPO / "report", tmp_path / "report")
    (tmp_path / "Snakefile").write_text(SNAKEFILE.replace("{VARIANT}", bench.SYNTHETIC_VARIANT))

    def smk(*args):
        snakemake(tmp_path, *args, timeout=600)

    smk("-c1", "report")  # the target rule
    smk("-c1", "results/accuracy_shown.json")
    smk("--report", "results/report.html")
    html = (tmp_path / "results" / "report.html").read_text()
    for category in ("throughput", "accuracy", "provenance"):
        assert category in html
    for fig in ("shard_throughput", "shard_timeline", "records", "efficiency"):
        for ext in ("pdf", "svg", "png"):
            assert f"{fig}.{ext}" in html

    targets = [
        f"results/report/{f}.{e}"
        for f in ("shard_throughput", "shard_timeline", "records", "efficiency")
        for e in ("png", "svg")
    ]
    assert_figures_render(chromium, tmp_path / "results" / "report.html", targets, tmp_path)


def assert_figures_render(chromium: str, html_file: Path, targets: list[str], workdir: Path) -> None:
    """Open a Snakemake HTML report in headless Chromium, show each target figure
    and check that exactly one image rendered for it (PNGs at their file's size)."""
    html = html_file.read_text()
    i = html.rfind("</body>")
    probe = workdir / "probe.html"
    probe.write_text(html[:i] + PROBE.replace("TARGETS", json.dumps(targets)) + html[i + len("</body>") :])
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--virtual-time-budget=60000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    match = re.search(r'<pre id="rb-result">([^<]*)</pre>', proc.stdout)
    assert match, "the report page did not finish rendering in Chromium:\n" + proc.stderr[-2000:]
    found = json.loads(match.group(1).replace("&quot;", '"'))
    from PIL import Image

    for name in targets:
        entry = found[name]
        assert entry["clicked"], name
        images = [m for m in entry["media"] if m["complete"] and m["w"] > 0 and m["h"] > 0]
        assert len(images) == 1, (name, entry)
        if name.endswith(".png"):  # Chromium decoded the very PNG we wrote
            assert (images[0]["w"], images[0]["h"]) == Image.open(workdir / name).size
