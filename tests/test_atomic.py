"""Atomic outputs: nothing appears at the final path until the writer finishes."""

import pytest

from rackbench.atomic import atomic_path, write_json_atomic


def test_file_appears_only_on_success(tmp_path):
    final = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("killed")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(final, {"a": 1})
    assert final.read_text() == '{\n  "a": 1\n}\n'


def test_directory_replaced_only_when_complete(tmp_path):
    final = tmp_path / "engine"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final, directory=True) as tmp:
            (tmp / "new").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in final.iterdir()] == ["old"]
    with atomic_path(final, directory=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_stale_temporaries_of_a_killed_attempt_are_removed(tmp_path):
    final = tmp_path / "shard0"
    stale = tmp_path / ".shard0.tmp-abc123"
    stale.mkdir()
    (stale / "mlperf_log_detail.txt").write_text("half")
    other = tmp_path / ".shard1.tmp-xyz"  # another output's temporary is left alone
    other.mkdir()
    with atomic_path(final, directory=True) as tmp:
        (tmp / "shard.json").write_text("{}")
    assert not stale.exists() and other.exists()
