"""sdpo_fast.files: atomic writes (text, JSON, figures) never leave a partial file or a stray temporary one."""

import json
from pathlib import Path

import pytest

from sdpo_fast.files import plain, save_figure, write_atomically, write_json


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
        write_atomically(path, 12345)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_figure_saved_as_png_and_closed(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plots" / "curve.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in path.parent.iterdir()] == ["curve.png"]


def test_plain_turns_paths_and_tuples_into_yaml_friendly_values():
    assert plain({"a": Path("x/y"), "b": (1, Path("z")), "c": {"d": [Path("w")]}}) == \
        {"a": "x/y", "b": [1, "z"], "c": {"d": ["w"]}}
