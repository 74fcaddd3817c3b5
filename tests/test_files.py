"""Atomic writes and the versioned JSON format (core/files.py)."""

from __future__ import annotations

import os

import pytest

from asyncdiff_partition.core.files import FileFormatError, read_json, write_atomic, write_json_atomic


def test_write_atomic_takes_text_and_bytes_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "new" / "dir" / "file.txt"
    assert write_atomic(target, "héllo\n") == target and target.read_text(encoding="utf-8") == "héllo\n"
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "plan.json"
    write_json_atomic(target, {"kind": "plan", "schema_version": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"kind": "plan", "bad": object()})  # not JSON: fails before the rename
    assert read_json(target, kind="plan", schema_version=1, fix="remake it") == {"kind": "plan", "schema_version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_read_json_names_the_problem_and_the_fix(tmp_path):
    with pytest.raises(FileFormatError, match="does not exist; run X"):
        read_json(tmp_path / "none.json", kind="plan", schema_version=1, fix="run X")
    write_json_atomic(tmp_path / "p.json", {"kind": "profile", "schema_version": 1})
    with pytest.raises(FileFormatError, match="is not a plan file"):
        read_json(tmp_path / "p.json", kind="plan", schema_version=1, fix="run X")


def test_an_unwritable_path_is_named_not_its_temp_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"cannot write '{blocker / 'out.json'}'") as error:
        write_atomic(blocker / "out.json", "x")
    assert ".tmp" not in str(error.value)
