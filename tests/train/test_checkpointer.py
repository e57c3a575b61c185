"""The Checkpointer: one owner of the .pt file vs sharded folder choice, for save, resume and load."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ldmclip.checkpoints import CheckpointError
from ldmclip.core.errors import UserError
from ldmclip.train.checkpointer import TRAINER_STATE, Checkpointer, list_checkpoints
from ldmclip.train.distributed import DistInfo


def _model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # so the optimizer has state (exp_avg...) to save
    return model, optimizer


def _checkpointer(directory, seed: int = 0, keep: int = 2) -> Checkpointer:
    model, optimizer = _model_and_optimizer(seed)
    return Checkpointer(directory, model, optimizer, keep, DistInfo())


def _assert_same_state(a: Checkpointer, b: Checkpointer) -> None:
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    state_a, state_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[index][name], state_b[index][name])


def test_save_writes_step_files_and_keeps_the_newest_n(tmp_path):
    saver = _checkpointer(tmp_path / "checkpoints", keep=2)
    paths = [saver.save(step, {"progress": {"step": step}}) for step in (5, 10, 15)]
    assert [p.name for p in paths] == ["step_00000005.pt", "step_00000010.pt", "step_00000015.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000015.pt"]


def test_keep_zero_keeps_every_checkpoint(tmp_path):
    saver = _checkpointer(tmp_path, keep=0)
    for step in (1, 2, 3):
        saver.save(step, {})
    assert len(list_checkpoints(tmp_path)) == 3


def test_load_restores_model_and_optimizer_and_returns_the_rest(tmp_path):
    saver = _checkpointer(tmp_path, seed=0)
    path = saver.save(7, {"scheduler": {"last_epoch": 7}, "progress": {"step": 7}})
    loader = _checkpointer(tmp_path, seed=1)  # other weights, other optimizer state
    assert not torch.equal(loader.model[0].weight, saver.model[0].weight)
    rest = loader.load(path)
    _assert_same_state(saver, loader)
    assert rest == {"scheduler": {"last_epoch": 7}, "progress": {"step": 7}}


def test_find_latest_skips_incomplete_checkpoints(tmp_path):
    saver = _checkpointer(tmp_path, keep=0)
    assert saver.find("latest") is None  # nothing yet: a fresh start
    assert saver.find(None) is None
    saver.save(3, {})
    saver.save(20, {})
    # what a killed run can leave: a temporary file, a sharded folder without its metadata
    (tmp_path / "step_00000030.pt.tmp").write_bytes(b"partial")
    (tmp_path / "step_00000040.tmp").mkdir()
    (tmp_path / "step_00000050").mkdir()
    (tmp_path / "step_00000050" / TRAINER_STATE).write_bytes(b"")
    assert saver.find("latest") == tmp_path / "step_00000020.pt"
    assert saver.find(str(tmp_path / "step_00000003.pt")) == tmp_path / "step_00000003.pt"


def test_find_a_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        _checkpointer(tmp_path).find(str(tmp_path / "step_00000099.pt"))


def test_a_pt_checkpoint_written_before_stays_readable(tmp_path):
    """The layout the trainer wrote before the Checkpointer: one dict with model, optimizer and the rest."""
    model, optimizer = _model_and_optimizer(3)
    old = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "progress": {"step": 4},
           "world_size": 1}
    torch.save(old, tmp_path / "step_00000004.pt")
    loader = _checkpointer(tmp_path, seed=4)
    found = loader.find("latest")
    assert found == tmp_path / "step_00000004.pt"
    assert loader.load(found) == {"progress": {"step": 4}, "world_size": 1}
    assert torch.equal(loader.model[2].bias, model[2].bias)


def test_a_sharded_folder_loads_into_an_unsharded_model(tmp_path):
    """A torch.distributed.checkpoint folder (as FSDP2 runs write) resumes in a single process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = _model_and_optimizer(5)
    folder = tmp_path / "step_00000006"
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"progress": {"step": 6}}, folder / TRAINER_STATE)
    loader = _checkpointer(tmp_path, seed=6)
    assert loader.find("latest") == folder
    assert loader.load(folder) == {"progress": {"step": 6}}
    _assert_same_state(Checkpointer(tmp_path, model, optimizer, 2, DistInfo()), loader)


def test_a_pt_file_cannot_resume_a_sharded_run(tmp_path):
    path = _checkpointer(tmp_path).save(1, {})
    loader = _checkpointer(tmp_path)
    loader.sharded = True  # what an FSDP2-sharded model makes it
    with pytest.raises(UserError, match="without --fsdp"):
        loader.load(path)


# ---- checkpoints that cannot be read


def _truncate(path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep is None else keep])


def test_resume_latest_falls_back_past_unreadable_checkpoints_and_says_so(tmp_path, capsys):
    saver = _checkpointer(tmp_path, seed=0, keep=0)
    good = saver.save(10, {"progress": {"step": 10}})
    _truncate(saver.save(20, {"progress": {"step": 20}}))  # cut short (a disk error, a copy that stopped)
    _truncate(saver.save(30, {"progress": {"step": 30}}), keep=0)  # zero bytes
    loader = _checkpointer(tmp_path, seed=1)
    path, rest = loader.resume("latest")
    assert path == good and rest == {"progress": {"step": 10}}
    _assert_same_state(saver, loader)  # saver's state is the one of step 10 (the optimizer did not step since)
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line
    assert "skipped 2 newer checkpoint(s)" in err and "step_00000020.pt" in err and "step_00000030.pt" in err
    assert "empty (0 bytes)" in err and f"resuming from {good}" in err


def test_resume_latest_with_no_readable_checkpoint_names_them(tmp_path):
    saver = _checkpointer(tmp_path, keep=0)
    _truncate(saver.save(5, {}))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read: step_00000005\.pt \(cannot read"):
        _checkpointer(tmp_path).resume("latest")


def test_resume_latest_with_nothing_saved_is_a_fresh_start(tmp_path):
    assert _checkpointer(tmp_path).resume("latest") is None
    assert _checkpointer(tmp_path).resume(None) is None


@pytest.mark.parametrize("damage", ["truncated", "empty", "pickle", "weights"])
def test_an_unreadable_checkpoint_named_explicitly_is_an_error_naming_it(tmp_path, damage):
    saver = _checkpointer(tmp_path, keep=0)
    path = saver.save(5, {})
    if damage == "truncated":
        _truncate(path)
    elif damage == "empty":
        _truncate(path, keep=0)
    elif damage == "pickle":  # a pickle of something that is not tensors: never unpickled
        import pickle

        path.write_bytes(pickle.dumps({"model": warnings.WarningMessage("x", UserWarning, "f", 1)}))
    else:  # a weights file, not a training checkpoint
        torch.save(saver.model.state_dict(), path)
    loader = _checkpointer(tmp_path)
    before = {k: v.clone() for k, v in loader.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=str(path)):
        loader.resume(str(path))
    assert all(torch.equal(before[k], v) for k, v in loader.model.state_dict().items())  # nothing half-loaded
