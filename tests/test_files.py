"""sdpo_fast.files: atomic writes never leave a partial file or a stray temporary one."""

import json
from pathlib import Path

import pytest

from sdpo_fast.files import plain, write_atomically, write_json


def test_write_replaces_whole_file_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "result.json"
    write_json(path, {"x": 1})
    write_json(path, {"y": [1, 2]})
    assert json.loads(path.read_text()) == {"y": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_failed_write_keeps_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    write_atomically(path, "old")
    with pytest.raises(TypeError):
        write_json(path, {"not serialisable": object()})
    with pytest.raises(TypeError):  # fails inside the write, after the temporary file exists
        write_atomically(path, b"bytes, not text")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_plain_turns_paths_and_tuples_into_yaml_friendly_values():
    assert plain({"a": Path("x/y"), "b": (1, Path("z")), "c": {"d": [Path("w")]}}) == \
        {"a": "x/y", "b": [1, "z"], "c": {"d": ["w"]}}
