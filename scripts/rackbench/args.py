"""Command-line argument helpers shared by every ``python -m rackbench.X``."""

from __future__ import annotations

import json
from pathlib import Path


def json_arg(value: str | None):
    """A JSON argument: inline JSON, or the path of a JSON file (inline JSON can be
    longer than a path may be, so text starting with ``{`` or ``[`` is always JSON).
    Empty or None gives {}."""
    if value is None or not value.strip():
        return {}
    if is_json_file(value):
        return json.loads(Path(value).read_text())
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise SystemExit(f"not JSON and not a JSON file: {value[:80]!r} ({err})") from None


def is_json_file(value: str | None) -> bool:
    """True where a JSON argument names a file rather than holding JSON inline."""
    return bool(value) and not value.lstrip().startswith(("{", "[")) and Path(value).is_file()
