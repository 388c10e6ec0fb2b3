"""download_model: manifests, local sources, damaged files, partial re-fetches."""

import json
import os

import pytest

from rackbench import download
from rackbench.download import ManifestError, download_model, verify_manifest


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "source"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(os.urandom(4096))
    (src / "sub" / "tokenizer.json").write_text("{}")
    return src


def test_local_source_writes_verified_manifest(source, tmp_path):
    out = tmp_path / "snapshot"
    manifest = download_model({"local": str(source)}, out)
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["files"]["model.safetensors"]["size"] == 4096
    verify_manifest(out)  # does not raise
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()


def test_truncated_file_is_named(source, tmp_path):
    out = tmp_path / "snapshot"
    download_model({"local": str(source)}, out)
    with open(out / "model.safetensors", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ManifestError, match=r"model\.safetensors: size 100 != 4096"):
        verify_manifest(out)


def test_altered_file_is_named(source, tmp_path):
    out = tmp_path / "snapshot"
    download_model({"local": str(source)}, out)
    (out / "sub" / "tokenizer.json").write_text("{ }")  # same size? no: one byte more
    (out / "config.json").write_text('{"model_type": "llamb"}')  # same size, other bytes
    with pytest.raises(ManifestError) as err:
        verify_manifest(out)
    assert "config.json: sha256 differs" in str(err.value)
    assert "sub/tokenizer.json" in str(err.value)


def test_rerun_fetches_only_missing_or_wrong(source, tmp_path, monkeypatch):
    out = tmp_path / "snapshot"
    download_model({"local": str(source)}, out)
    (out / "config.json").unlink()
    with open(out / "model.safetensors", "r+b") as handle:
        handle.truncate(10)
    copied = []
    real_copy = download.shutil.copy2
    monkeypatch.setattr(download.shutil, "copy2", lambda a, b: (copied.append(os.path.basename(a)), real_copy(a, b)))
    download_model({"local": str(source)}, out)
    assert sorted(copied) == ["config.json", "model.safetensors"]  # tokenizer.json was kept
    verify_manifest(out)


def test_missing_source_fails_without_leaving_output(tmp_path):
    out = tmp_path / "snapshot"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        download_model({"local": str(tmp_path / "nowhere")}, out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".snapshot")]


def test_hub_source_needs_pinned_revision(tmp_path):
    with pytest.raises(ValueError, match="no pinned revision"):
        download_model({"repo_id": "meta-llama/Llama-2-70b-chat-hf"}, tmp_path / "snapshot")


def test_cli_verify_only(source, tmp_path):
    out = tmp_path / "snapshot"
    assert download.main(["--local", str(source), "--out", str(out)]) == 0
    assert download.main(["--local", str(source), "--out", str(out), "--verify-only"]) == 0
    (out / "config.json").write_text("tampered")
    assert download.main(["--local", str(source), "--out", str(out), "--verify-only"]) == 1


# ---- the Hugging Face Hub path, against a fake Hub on loopback ----------------
REPO = "meta-llama/Llama-2-70b-chat-hf"
REVISION = "e9149a12809580e8602995856f8098ce973d1080"
TOKEN = "hf_" + "PlantedTestTokenDoNotLeak0123456789"


@pytest.fixture
def fake_hub():
    from fake_hub import FakeHub

    hub = FakeHub(
        {
            "config.json": b'{"model_type": "llama"}',
            "model-00001-of-00002.safetensors": os.urandom(3000),
            "model-00002-of-00002.safetensors": os.urandom(2000),
        },
        REPO,
        REVISION,
    )
    url = hub.start()
    yield hub, url
    hub.stop()


def _run_cli(url, out, *extra):
    import subprocess
    import sys

    env = dict(
        os.environ, HF_ENDPOINT=url, HF_TOKEN=TOKEN, HF_HOME=str(out.parent / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1"
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rackbench.download",
            "--repo-id",
            REPO,
            "--revision",
            REVISION,
            "--out",
            str(out),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hub_download_pinned_with_token_never_written(fake_hub, tmp_path):
    hub, url = fake_hub
    out = tmp_path / "snapshot"
    proc = _run_cli(url, out)
    assert proc.returncode == 0, proc.stderr
    assert hub.downloaded() == sorted(hub.files)
    # every request asked for the pinned revision and carried the token
    resolves = [r for r in hub.requests if "/resolve/" in r[1] or "/tree/" in r[1]]
    assert resolves and all(REVISION in path and auth == f"Bearer {TOKEN}" for _, path, auth in resolves)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == {"repo_id": REPO, "revision": REVISION}
    verify_manifest(out)
    # the token is in no file and no log
    assert TOKEN not in proc.stdout + proc.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_hub_rerun_fetches_only_damaged_file(fake_hub, tmp_path):
    hub, url = fake_hub
    out = tmp_path / "snapshot"
    assert _run_cli(url, out).returncode == 0
    with open(out / "model-00002-of-00002.safetensors", "r+b") as handle:
        handle.truncate(5)
    hub.requests.clear()
    assert _run_cli(url, out).returncode == 0
    assert hub.downloaded() == ["model-00002-of-00002.safetensors"]
    verify_manifest(out)


def test_provenance_is_recorded_beside_the_files_not_in_the_manifest(source, tmp_path):
    out = tmp_path / "snapshot"
    manifest = download_model({"local": str(source)}, out)
    record = json.loads((out / "provenance.json").read_text())
    from rackbench.provenance import config_hash

    assert record["step"] == "download_model"
    assert record["config_sha256"] == config_hash({"local": str(source)})
    assert record["packages"]["torch"]  # versions of what the workflow runs with
    assert "provenance.json" not in manifest["files"]
    verify_manifest(out)
