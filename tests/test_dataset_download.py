"""download_dataset: MLCommons' R2 protocol against a local stand-in server; the real config plans without data."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from conftest import ROOT, copy_workflow, snakemake
from rackbench import dataset_download as dd
from rackbench.dataset import expected_sha256

SAMPLES = "open_orca_gpt4_tokenized_llama.sampled_24576.pkl"
CALIB = "open_orca_gpt4_tokenized_llama.calibration_1000.pkl"


class FakeR2:
    """A FAKE MLCommons R2 bucket on loopback: ``/metadata/<name>.uri`` (the base URL),
    ``/metadata/<name>.md5`` (the published list) and the files under ``/bucket/<name>/``."""

    def __init__(self, files: dict[str, bytes], name="llama-2-70b-open-orca-dataset"):
        self.files, self.name, self.requests = dict(files), name, []
        self.published = {rel: hashlib.md5(data).hexdigest() for rel, data in files.items()}
        self.redirect_to_login = False

    def start(self):
        r2 = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                r2.requests.append(self.path)
                base = f"http://127.0.0.1:{self.server.server_address[1]}"
                if r2.redirect_to_login:
                    self.send_response(302)
                    self.send_header("Location", f"{base}/cdn-cgi/access/login/x")
                    self.end_headers()
                    return
                if self.path == f"/metadata/{r2.name}.uri":
                    body = f"{base}/bucket/{r2.name}\n".encode()
                elif self.path == f"/metadata/{r2.name}.md5":
                    body = "".join(f"{md5}  ./{rel}\n" for rel, md5 in r2.published.items()).encode()
                elif (
                    self.path.startswith(f"/bucket/{r2.name}/")
                    and self.path.split(f"/bucket/{r2.name}/", 1)[1] in r2.files
                ):
                    body = r2.files[self.path.split(f"/bucket/{r2.name}/", 1)[1]]
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/metadata/{self.name}.uri"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def r2():
    server = FakeR2(
        {
            f"open_orca/{SAMPLES}": os.urandom(5000),
            f"open_orca/{CALIB}": os.urandom(3000),
            "open_orca/README.txt": b"other files in the bucket are not fetched",
        }
    )
    uri = server.start()
    yield server, uri
    server.stop()


FILES = {"samples": SAMPLES, "calibration": CALIB}


def test_download_verifies_and_records_checksums(r2, tmp_path):
    server, uri = r2
    manifest = dd.download_dataset(uri, FILES, tmp_path / "dl")
    for role, rel in (("samples", f"open_orca/{SAMPLES}"), ("calibration", f"open_orca/{CALIB}")):
        path = tmp_path / "dl" / f"{role}.pkl"
        assert path.read_bytes() == server.files[rel]
        assert manifest["files"][role]["md5"] == server.published[rel]
        # prepare_dataset reads the recorded SHA256SUMS
        assert (
            expected_sha256(path, sha256_file_path=str(tmp_path / "dl" / dd.CHECKSUMS))
            == hashlib.sha256(server.files[rel]).hexdigest()
        )
    assert not any("README" in p for p in server.requests)
    assert (tmp_path / "dl" / "llama-2-70b-open-orca-dataset.md5").is_file()


def test_rerun_fetches_nothing_already_verified(r2, tmp_path):
    server, uri = r2
    dd.download_dataset(uri, FILES, tmp_path / "dl")
    (tmp_path / "dl" / "calibration.pkl").write_bytes(b"damaged")
    server.requests.clear()
    manifest = dd.download_dataset(uri, FILES, tmp_path / "dl")
    assert manifest["files"]["samples"]["fetched"] is False and manifest["files"]["calibration"]["fetched"] is True
    assert [p for p in server.requests if p.startswith("/bucket/")] == [f"/bucket/{server.name}/open_orca/{CALIB}"]


def test_corrupt_download_is_refused_and_not_kept(r2, tmp_path):
    server, uri = r2
    server.files[f"open_orca/{SAMPLES}"] = b"bit rot on the way"
    with pytest.raises(dd.DownloadError, match=rf"{SAMPLES}: md5 [0-9a-f]{{32}} != published"):
        dd.download_dataset(uri, FILES, tmp_path / "dl")
    assert not (tmp_path / "dl" / "samples.pkl").exists()


def test_recorded_sha256_must_match_too(r2, tmp_path):
    _, uri = r2
    with pytest.raises(dd.DownloadError, match="sha256 .* != recorded 0000"):
        dd.download_dataset(uri, FILES, tmp_path / "dl", sha256={"samples": "0" * 64})
    assert not (tmp_path / "dl" / "samples.pkl").exists()


def test_missing_file_and_login_redirect_are_named(r2, tmp_path):
    server, uri = r2
    with pytest.raises(dd.DownloadError, match=r"nope.pkl: not in the published checksum list \(3 files: open_orca/"):
        dd.download_dataset(uri, {"samples": "nope.pkl"}, tmp_path / "dl")
    server.redirect_to_login = True
    assert dd.main(["--uri", uri, "--file", f"samples={SAMPLES}", "--out", str(tmp_path / "dl")]) == 2
    with pytest.raises(dd.DownloadError, match="needs a Cloudflare Access login"):
        dd.download_dataset(uri, FILES, tmp_path / "dl")


def _plan(workdir, configfile):
    return snakemake(workdir, "-n", "-p", "--configfile", str(configfile), timeout=600)


def test_real_config_plans_on_a_fresh_clone_without_the_data(tmp_path):
    """No /data, no results/: download_dataset is planned on the login node, before prepare_dataset,
    and the TensorRT-LLM jobs start through trtllm-llmapi-launch."""
    workdir = copy_workflow(tmp_path / "clone")
    assert not (workdir / "results").exists()
    proc = _plan(workdir, "config/llama2-70b-gb300.yaml")
    out = proc.stdout
    assert re.search(r"^(local)?rule download_dataset:", out, re.M), out[:3000]
    assert "localrule: True" in (ROOT / "rules/dataset_download.smk").read_text()  # the login node, as download_model
    assert (
        "python -m rackbench.dataset_download --uri https://inference.mlcommons-storage.org/metadata/"
        "llama-2-70b-open-orca-dataset.uri --file=samples=" + SAMPLES in out
    )
    assert "--pickle results/datasets/open-orca/download/samples.pkl" in out
    assert re.search(r"trtllm-llmapi-launch python -m rackbench\.harness ", out)
    assert re.search(r"trtllm-llmapi-launch python -m rackbench\.build_engine ", out)
    # a local copy in the config: no download step
    config = yaml.safe_load((ROOT / "config/llama2-70b-gb300.yaml").read_text())
    ds = config["datasets"]["open-orca"]
    del ds["download"]
    for role in ("samples", "calibration"):
        local = tmp_path / f"{role}.pkl"
        local.write_bytes(b"stand-in")
        ds[role] = {"path": str(local), "sha256": hashlib.sha256(b"stand-in").hexdigest()}
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(config))
    assert "download_dataset" not in _plan(workdir, tmp_path / "local.yaml").stdout


def test_gb200_azure_config_is_valid():
    from rackbench.config import check_config, configurations

    config = yaml.safe_load((ROOT / "config/llama2-70b-gb200-azure.yaml").read_text())
    for part in ("samples", "calibration"):  # its data is a local copy: stand in for it
        config["datasets"]["open-orca"][part] = {"path": str(ROOT / "README.md"), "sha256": "0" * 64}
    check_config(config)
    assert [c.key for c in configurations(config)] == ["llama2-70b/nvfp4/tensorrt-llm/GB200/bs2048/18x4"]
