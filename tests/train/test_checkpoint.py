"""Atomic DCP checkpoints: round trip, interrupted writes, pruning."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from sdpo_fast.train import checkpoint as ckpt

# DCP warns that it saves in a single process: that is what these tests do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _state(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    return model, opt


def _app_state(model, opt):
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def test_round_trip_restores_model_optimizer_and_extras(tmp_path):
    model, opt = _state(0)
    rng = torch.get_rng_state()
    ckpt.save_checkpoint(tmp_path, 3, _app_state(model, opt), {"rng": rng, "pos": 7})
    other, other_opt = _state(1)
    state = _app_state(other, other_opt)
    extras = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), state)
    other.load_state_dict(state["model"])
    other_opt.load_state_dict(state["optim"])
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert extras["pos"] == 7 and torch.equal(extras["rng"], rng)


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, opt = _state(0)
    ckpt.save_checkpoint(tmp_path, 1, _app_state(model, opt), {"step": 1})

    def crash_midway(state, checkpoint_id):
        os.makedirs(checkpoint_id, exist_ok=True)
        torch.save(state["model"], f"{checkpoint_id}/partial.pt")  # some bytes hit the disk first
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(ckpt.dcp, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, _app_state(*_state(5)), {"step": 2})
    monkeypatch.undo()

    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest == ckpt.step_dir(tmp_path, 1)
    fresh, fresh_opt = _state(9)
    state = _app_state(fresh, fresh_opt)
    assert ckpt.load_checkpoint(latest, state) == {"step": 1}
    fresh.load_state_dict(state["model"])
    assert torch.equal(fresh.weight, model.weight)
    # the next save cleans up the debris and publishes normally
    ckpt.save_checkpoint(tmp_path, 2, _app_state(model, opt), {"step": 2})
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 2)
    assert not list(tmp_path.glob(".tmp-*"))


def test_pruning_keeps_newest_and_drops_abandoned_timeline(tmp_path):
    model, opt = _state(0)
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, _app_state(model, opt), {}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003", "step-00000004"]
    ckpt.save_checkpoint(tmp_path, 3, _app_state(model, opt), {"again": True}, keep=2)  # resumed from 3
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), _app_state(model, opt)) == {"again": True}


def test_dangling_latest_falls_back_to_newest_directory(tmp_path):
    model, opt = _state(0)
    ckpt.save_checkpoint(tmp_path, 1, _app_state(model, opt), {})
    (tmp_path / "latest").write_text("step-00000099\n")
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 1)
    assert ckpt.latest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("where", ["dcp", "extras"])
def test_full_disk_names_the_failure_and_the_remaining_checkpoint(tmp_path, monkeypatch, where):
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_files

    model, opt = _state(0)
    ckpt.save_checkpoint(tmp_path, 1, _app_state(model, opt), {"step": 1})
    if where == "dcp":  # the shard writer inside DCP hits the full disk (DCP wraps it per rank)
        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(dcp_files, "_write_item", disk_full)
    else:  # torch.save of the extras reports a full disk as a RuntimeError of its zip writer
        real_save = torch.save

        def disk_full(obj, f, *args, **kwargs):
            if str(f).endswith(".pt"):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save_checkpoint(tmp_path, 2, _app_state(model, opt), {"step": 2})
    monkeypatch.undo()
    message = str(info.value)
    assert not message.startswith("[Errno"), message  # one readable line on the CLI
    assert "step-00000002" in message and str(tmp_path) in message and "disk is full" in message, message
    assert f"latest complete checkpoint is {ckpt.step_dir(tmp_path, 1)}" in message
    assert info.value.errno == errno.ENOSPC
    assert not list(tmp_path.glob(".tmp-*"))  # the partial directory is gone
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 1)


def test_checkpointer_saves_the_rank_entry_per_rank_and_the_rest_with_dcp(tmp_path):
    model, opt = _state(0)
    manager = ckpt.Checkpointer(tmp_path, keep=1)
    with pytest.raises(ValueError, match="no checkpoint under"):
        manager.load_latest({**_app_state(model, opt), ckpt.RANK_STATE: {}})
    for step in (1, 2):
        path = manager.save(step, {**_app_state(model, opt), ckpt.RANK_STATE: {"step": step}})
    assert path == ckpt.step_dir(tmp_path, 2) and sorted(p.name for p in tmp_path.glob("step-*")) == [path.name]
    assert torch.load(path / "extras-rank0.pt") == {"step": 2}  # the rank's own file, not a DCP entry
    fresh, fresh_opt = _state(7)
    state = {**_app_state(fresh, fresh_opt), ckpt.RANK_STATE: {"step": 0}}
    assert manager.load_latest(state) == path
    fresh.load_state_dict(state["model"])
    assert state[ckpt.RANK_STATE] == {"step": 2} and torch.equal(fresh.weight, model.weight)
