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
