"""A checkpoint that cannot be used (a pickle, zero bytes, cut short, a text file, the wrong shapes) is one
line naming the file, exit status 2, from `ldmclip train --pretrained` and `--resume`: never a traceback."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

import ldmclip
from ldmclip.cli import main
from ldmclip.core.files import write_safetensors

TINY = "ViT-T-8-64"


def _bad_file(kind: str, tmp_path):
    """A file of ``kind``, and a phrase its message must hold."""
    state = ldmclip.create_model(TINY).state_dict()
    if kind == "pickle":  # would build a non-tensor object: refused, never unpickled
        path = tmp_path / "evil.pt"
        path.write_bytes(pickle.dumps({"model": warnings.WarningMessage("x", UserWarning, "f", 1)}))
        return path, "refusing to load"
    if kind == "zero-bytes":
        path = tmp_path / "zero.pt"
        path.write_bytes(b"")
        return path, "empty (0 bytes)"
    if kind == "notes":
        path = tmp_path / "notes.txt"
        path.write_text("not a checkpoint\n")
        return path, "not a checkpoint"
    if kind in ("truncated-safetensors", "bad-header-safetensors", "truncated-pt"):
        path = tmp_path / ("cut.pt" if kind == "truncated-pt" else "cut.safetensors")
        if kind == "truncated-pt":
            torch.save(state, path)
        else:
            write_safetensors(path, state)
        data = path.read_bytes()
        path.write_bytes(b"\xff" * 8 + data[8:] if kind == "bad-header-safetensors" else data[: len(data) // 2])
        return path, "truncated"
    assert kind in ("wrong-shapes", "odd-grid")
    # every tensor misshaped, or only the positional embedding: a grid of 17 patches, not a square
    path = tmp_path / "wrong.safetensors"
    wrong = {k: torch.zeros(3, 5) for k in state} if kind == "wrong-shapes" else dict(state)
    wrong["visual.positional_embedding"] = torch.zeros(18, state["visual.positional_embedding"].shape[1])
    write_safetensors(path, wrong)
    return path, "mis-shaped keys ("


def _one_line_error(capsys, command: str, path, phrase: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ldmclip {command}: error: "), err
    assert str(path) in err and phrase in err
    return err


KINDS = ["pickle", "zero-bytes", "notes", "truncated-safetensors", "bad-header-safetensors", "truncated-pt",
         "wrong-shapes", "odd-grid"]


@pytest.mark.parametrize("kind", KINDS)
def test_pretrained_that_is_not_a_usable_checkpoint_is_one_line(tmp_path, capsys, kind):
    path, phrase = _bad_file(kind, tmp_path)
    assert main(["train", "--model", TINY, "--pretrained", str(path), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--quiet"]) == 2
    err = _one_line_error(capsys, "train", path, phrase)
    assert "square grid" not in err
    if kind == "odd-grid":
        assert "mis-shaped keys (1): visual.positional_embedding: checkpoint (18, 128) vs model (65, 128)" in err
    assert not (tmp_path / "run").exists()  # a run that never started leaves no folder


@pytest.mark.parametrize("kind", ["pickle", "zero-bytes", "truncated-pt", "notes"])
def test_resume_from_an_unreadable_checkpoint_is_one_line(tmp_path, capsys, kind):
    path, phrase = _bad_file(kind, tmp_path)
    assert main(["train", "--model", TINY, "--resume", str(path), "--out", str(tmp_path / "run"),
                 "--steps", "1", "--quiet", "--val-size", "8"]) == 2
    _one_line_error(capsys, "train", path, phrase)


@pytest.mark.slow
def test_resume_latest_past_a_truncated_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", TINY, "--out", str(run), "--batch-size", "4", "--val-size", "4", "--workers", "0",
            "--save-every", "1", "--keep-checkpoints", "0", "--eval-every", "0", "--quiet"]
    assert main([*argv, "--steps", "2"]) == 0
    newest = run / "checkpoints" / "step_00000002.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main([*argv, "--steps", "3", "--resume", "latest"]) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if "--resume latest" in line]
    assert len(skipped) == 1 and str(newest.name) in skipped[0] and "truncated" in skipped[0]
    assert f"resumed from {run / 'checkpoints' / 'step_00000001.pt'} at step 1" in captured.out
    assert (run / "checkpoints" / "step_00000003.pt").is_file()
