"""download_model: fetch a model at a pinned revision and verify every file.

Sources: a Hugging Face Hub repo at a pinned commit (``snapshot_download``;
token from ``$HF_TOKEN``, passed in memory only), or a local directory (air-gapped
clusters, the demo). Either way the snapshot gets ``manifest.json`` with each
file's size and sha256, and the manifest is verified after writing.

A rerun keeps files whose checksum matches the manifest and fetches only what is
missing or wrong.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from rackbench.atomic import atomic_path, sha256_file, write_json_atomic
from rackbench.provenance import write_provenance

MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"  # written beside the files, not part of the model
log = logging.getLogger("rackbench.download")


class ManifestError(RuntimeError):
    """A file is missing, truncated or altered relative to the manifest."""


def build_manifest(root: Path, *, source: dict) -> dict:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, PROVENANCE)):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".cache/"):  # huggingface_hub's own bookkeeping
            continue
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if not files:
        raise ManifestError(f"{root}: no files to record; is the source empty?")
    return {"source": source, "files": files}


def verify_manifest(root: Path, manifest: dict | None = None) -> None:
    """Raise ManifestError naming every file that is missing or differs."""
    root = Path(root)
    if manifest is None:
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            raise ManifestError(f"{manifest_path} is missing")
        manifest = json.loads(manifest_path.read_text())
    problems = []
    for rel, expect in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != expect["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} != {expect['size']} (truncated or altered)")
        elif sha256_file(path) != expect["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (altered)")
    if problems:
        raise ManifestError(f"{root} fails its manifest check: " + "; ".join(problems))


def _files_to_keep(previous: Path) -> dict[str, dict]:
    """Files of an earlier (possibly damaged) snapshot that still match its manifest."""
    manifest_path = previous / MANIFEST
    if not manifest_path.is_file():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    good = {}
    for rel, expect in manifest.get("files", {}).items():
        path = previous / rel
        if path.is_file() and path.stat().st_size == expect["size"] and sha256_file(path) == expect["sha256"]:
            good[rel] = expect
    return good


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def fetch_local(source_dir: Path, staging: Path, keep: dict[str, dict], previous: Path | None) -> None:
    if not source_dir.is_dir():
        raise FileNotFoundError(f"model source directory {source_dir} does not exist")
    for path in sorted(p for p in source_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(source_dir).as_posix()
        if rel in (MANIFEST, PROVENANCE) or rel.startswith(".cache/"):
            continue
        if rel in keep and previous is not None:
            _link_or_copy(previous / rel, staging / rel)
        else:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staging / rel)


def fetch_hub(
    repo_id: str,
    revision: str,
    staging: Path,
    keep: dict[str, dict],
    previous: Path | None,
    allow_patterns: list[str] | None = None,
) -> None:
    from huggingface_hub import snapshot_download

    # Good files from an earlier attempt are placed first; snapshot_download then
    # skips nothing by itself (local_dir has no metadata for them), so we pass
    # only the missing names when we know the file list.
    for rel in keep:
        _link_or_copy(previous / rel, staging / rel)
    token = os.environ.get("HF_TOKEN") or None  # never logged, never written
    snapshot_download(
        repo_id=repo_id,
        revision=revision,
        local_dir=str(staging),
        token=token,
        allow_patterns=allow_patterns,
        ignore_patterns=list(keep) or None,
    )
    shutil.rmtree(staging / ".cache", ignore_errors=True)


def download_model(source: dict, out_dir: str | os.PathLike) -> dict:
    """Materialise ``source`` at ``out_dir`` with a verified manifest; return the manifest."""
    out_dir = Path(out_dir)
    previous = out_dir if out_dir.is_dir() else None
    keep = _files_to_keep(out_dir) if previous else {}
    if keep:
        log.info("keeping %d file(s) that already match the manifest", len(keep))
    public_source = {k: v for k, v in source.items() if k != "token"}
    with atomic_path(out_dir, directory=True) as staging:
        if "local" in source:
            fetch_local(Path(source["local"]), staging, keep, previous)
        elif "repo_id" in source:
            if not source.get("revision"):
                raise ValueError(f"model source {source['repo_id']} has no pinned revision")
            fetch_hub(source["repo_id"], source["revision"], staging, keep, previous, source.get("allow_patterns"))
        else:
            raise ValueError("model source needs `local` or `repo_id` + `revision`")
        manifest = build_manifest(staging, source=public_source)
        expected = source.get("sha256")
        if expected:  # optional pins per file from the config
            for rel, digest in expected.items():
                if manifest["files"].get(rel, {}).get("sha256") != digest:
                    raise ManifestError(f"{rel}: sha256 does not match the pin in the config")
        write_json_atomic(staging / MANIFEST, manifest)
        verify_manifest(staging)
        write_provenance(staging / PROVENANCE, step="download_model", config_fragment=public_source)
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--local", help="local directory to take the model from")
    group.add_argument("--repo-id", help="Hugging Face Hub repo id")
    parser.add_argument("--revision", help="pinned commit of the repo (required with --repo-id)")
    parser.add_argument("--out", required=True, help="snapshot directory to write")
    parser.add_argument("--verify-only", action="store_true", help="only check an existing snapshot")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.verify_only:
            verify_manifest(Path(args.out))
            log.info("%s matches its manifest", args.out)
            return 0
        source = {"local": args.local} if args.local else {"repo_id": args.repo_id, "revision": args.revision}
        manifest = download_model(source, args.out)
    except (ManifestError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 1
    log.info("wrote %s: %d files verified", args.out, len(manifest["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
