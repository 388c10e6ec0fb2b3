"""download_dataset: MLPerf's processed OpenOrca files through MLCommons' R2 distribution.

``python -m rackbench.dataset_download --uri URL --file samples=NAME --file calibration=NAME --out DIR
[--sha256 samples=HEX ...]``

MLCommons publishes the llama2-70b dataset with its R2 downloader
(mlcommons/r2-downloader ``mlc-r2-downloader.sh``; the command is in mlcommons/inference
language/llama2-70b/README.md). Its protocol, which this module follows:

1. ``GET <name>.uri`` -> the base URL of the dataset's files (one line);
2. ``GET <same directory>/<name>.md5`` -> ``<md5>  <relative path>`` lines: the published checksums;
3. ``GET <base URL>/<relative path>`` for each file, then ``md5sum -c``.

Only the files the benchmark uses are fetched (found in the published list by file name), each
written to a temporary name and renamed once its MD5 matches the published one (and the
SHA-256 matches too where the config pins one: a recorded manifest). ``DIR/<role>.pkl`` (role:
samples, calibration) are the outputs, with ``DIR/SHA256SUMS`` recording their SHA-256 for
prepare_dataset and the published ``.md5`` kept beside them. A file already present with the
right checksum is not fetched again.

Runs on the login node (a localrule, like download_model: compute nodes often have no network).
Protected datasets: set ``CF_ACCESS_TOKEN`` (a Cloudflare Access token, as the R2 downloader's
login yields); it is sent as the ``cf-access-token`` header and never written anywhere.
A config that names a local copy (paths outside results/) skips this step altogether.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from rackbench import paths
from rackbench.atomic import atomic_path, sha256_file, write_text_atomic

TOKEN_ENV = "CF_ACCESS_TOKEN"
ROLES = ("samples", "calibration")
CHECKSUMS = "SHA256SUMS"
CHUNK = 1 << 20


class DownloadError(Exception):
    """A download that cannot complete; one line naming the file or URL. Exit status 2."""


def download_dir(dataset: str) -> str:
    """Where download_dataset writes a dataset's files (the rule's output directory)."""
    return paths.DATASET_DOWNLOAD_PATTERN.format(dataset=dataset)


def role_path(dataset: str, role: str) -> str:
    return f"{download_dir(dataset)}/{role}.pkl"


def checksum_path(dataset: str) -> str:
    return f"{download_dir(dataset)}/{CHECKSUMS}"


def is_downloaded(path: str, config: dict) -> bool:
    """True if ``path`` is a file download_dataset makes for a dataset with a ``download`` section."""
    for name, dataset in (config.get("datasets") or {}).items():
        if dataset.get("download") and Path(path).as_posix() in (
            *(role_path(name, role) for role in ROLES),
            checksum_path(name),
        ):
            return True
    return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Like the R2 downloader (wget --max-redirect=0): a redirect is an answer, not a hop.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def download_args(spec: dict) -> str:
    """The command-line arguments for a config's ``datasets.<name>.download`` section (shell-quoted)."""
    import shlex

    args = ["--uri", spec["r2_uri"]] + [f"--file={role}={name}" for role, name in spec["files"].items()]
    args += [f"--sha256={role}={digest}" for role, digest in (spec.get("sha256") or {}).items()]
    return " ".join(shlex.quote(a) for a in args)


def _open(url: str, timeout: float = 60):
    headers = {"User-Agent": "rackbench-dataset-download"}
    token = os.environ.get(TOKEN_ENV)
    if token:
        headers["cf-access-token"] = token
    try:
        return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        location = err.headers.get("Location", "") if err.headers else ""
        if 300 <= err.code < 400 and ("cloudflareaccess.com" in location or "/cdn-cgi/access/login" in location):
            raise DownloadError(
                f"{url} needs a Cloudflare Access login (redirected to {location}); log in with "
                f"MLCommons' R2 downloader and set {TOKEN_ENV}, or download by hand and point "
                "datasets.<name>.samples/calibration.path at the local copy"
            ) from None
        where = f" to {location}" if location else ""
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}{where}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"{url}: {getattr(err, 'reason', err)}") from None


def _get_text(url: str) -> str:
    with _open(url) as response:
        return response.read().decode("utf-8")


def published_md5(uri: str) -> tuple[str, dict[str, str], str]:
    """(base URL, {relative path: md5}, md5 list text) for an R2 ``.uri`` metadata URL."""
    parsed = urllib.parse.urlsplit(uri)
    if not parsed.scheme or not parsed.path.endswith(".uri"):
        raise DownloadError(f"{uri}: not an R2 dataset metadata URL (https://host/path/<name>.uri)")
    base = _get_text(uri).strip()
    if not base.startswith(("http://", "https://")):
        raise DownloadError(f"{uri}: expected the dataset's base URL, got {base[:80]!r}")
    name = posixpath.basename(parsed.path)[: -len(".uri")]
    md5_url = urllib.parse.urlunsplit(
        parsed._replace(path=posixpath.join(posixpath.dirname(parsed.path), f"{name}.md5"))
    )
    text = _get_text(md5_url)
    sums = {}
    for line in text.splitlines():
        digest, _, rel = line.strip().partition(" ")
        rel = rel.strip().lstrip("*")
        if rel.startswith("./"):
            rel = rel[2:]
        if len(digest) == 32 and rel:
            sums[rel] = digest.lower()
    if not sums:
        raise DownloadError(f"{md5_url}: no '<md5>  <file>' lines")
    return base.rstrip("/"), sums, text


def find_published(sums: dict[str, str], file_name: str) -> str:
    """The relative path in the published list whose file name is ``file_name``."""
    hits = [rel for rel in sums if posixpath.basename(rel) == file_name]
    if len(hits) != 1:
        listed = ", ".join(sorted(sums)[:12])
        raise DownloadError(
            f"{file_name}: {'not in' if not hits else 'ambiguous in'} the published checksum list "
            f"({len(sums)} files: {listed}{', ...' if len(sums) > 12 else ''})"
        )
    return hits[0]


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str) -> None:
    with atomic_path(dest) as tmp:
        digest = hashlib.md5(usedforsecurity=False)
        with _open(url, timeout=120) as response, open(tmp, "wb") as out:
            for block in iter(lambda: response.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != md5:
            raise DownloadError(f"{url}: md5 {digest.hexdigest()} != published {md5}; nothing kept")


def download_dataset(
    uri: str, files: dict[str, str], out: str | os.PathLike, sha256: dict[str, str] | None = None
) -> dict:
    """Fetch ``files`` (role -> published file name) into ``out``; returns the manifest written."""
    out, sha256 = Path(out), {k: v.lower() for k, v in (sha256 or {}).items()}
    unknown = sorted(set(files) - set(ROLES)) + sorted(set(sha256) - set(files))
    if unknown:
        raise DownloadError(f"unknown file role(s) {unknown}; known: {', '.join(ROLES)}")
    base, sums, md5_text = published_md5(uri)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"uri": uri, "base_url": base, "files": {}}
    for role, file_name in files.items():
        rel = find_published(sums, file_name)
        dest = out / f"{role}.pkl"
        fetched = not (dest.is_file() and md5_file(dest) == sums[rel])
        if fetched:
            _fetch(f"{base}/{urllib.parse.quote(rel)}", dest, sums[rel])
        digest = sha256_file(dest)
        if role in sha256 and digest != sha256[role]:
            dest.unlink()
            raise DownloadError(
                f"{file_name}: sha256 {digest} != recorded {sha256[role]} (the published md5 "
                "matched: the recorded manifest names another file); removed"
            )
        manifest["files"][role] = {
            "published_as": rel,
            "md5": sums[rel],
            "sha256": digest,
            "size": dest.stat().st_size,
            "fetched": fetched,
        }
    write_text_atomic(out / posixpath.basename(urllib.parse.urlsplit(uri).path).replace(".uri", ".md5"), md5_text)
    write_text_atomic(out / CHECKSUMS, "".join(f"{m['sha256']}  {role}.pkl\n" for role, m in manifest["files"].items()))
    write_text_atomic(out / "download.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _pairs(items: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise DownloadError(f"--{what} {item!r}: expected ROLE=VALUE")
        pairs[key] = value
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rackbench.dataset_download", description=__doc__.split("\n")[0])
    parser.add_argument("--uri", required=True, help="R2 dataset metadata URL (<name>.uri)")
    parser.add_argument("--file", action="append", required=True, help="ROLE=FILE_NAME in the published list")
    parser.add_argument("--sha256", action="append", default=[], help="ROLE=HEX: recorded manifest to verify too")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        manifest = download_dataset(args.uri, _pairs(args.file, "file"), args.out, _pairs(args.sha256, "sha256"))
    except DownloadError as err:
        print(f"download_dataset: error: {err}", file=sys.stderr)
        return 2
    for role, m in manifest["files"].items():
        print(
            f"download_dataset: {role}.pkl <- {m['published_as']} ({m['size']} bytes, md5 ok"
            f"{', fetched' if m['fetched'] else ', already present'})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
