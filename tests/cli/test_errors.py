"""One place turns errors into output: a mistake the user can fix is one line (exit 2); anything else keeps
its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ldmclip.cli.info
from ldmclip.checkpoints import CheckpointError
from ldmclip.cli import main
from ldmclip.core.errors import UserError
from ldmclip.train import PeerFailure, TrainingError


def _raising(error: BaseException):
    def run(args):
        raise error

    return run


@pytest.mark.parametrize("error", [UserError("--batch-size must be at least 1"),
                                   CheckpointError("--batch-size must be at least 1"),
                                   TrainingError("--batch-size must be at least 1")])
def test_a_user_error_is_one_line(monkeypatch, capsys, error):
    monkeypatch.setattr(ldmclip.cli.info, "run", _raising(error))
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "ldmclip info: error: --batch-size must be at least 1\n"


def test_a_missing_path_is_one_line_naming_it(monkeypatch, capsys):
    monkeypatch.setattr(ldmclip.cli.info, "run", _raising(FileNotFoundError(2, "No such file or directory",
                                                                            "data/x.csv")))
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "ldmclip info: error: No such file or directory: data/x.csv\n"


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   ValueError("mat1 and mat2 shapes cannot be multiplied"), KeyError("visual"),
                                   PeerFailure("rank 1 of 2: a collective operation failed")])
def test_any_other_error_keeps_its_traceback(monkeypatch, error):
    monkeypatch.setattr(ldmclip.cli.info, "run", _raising(error))
    with pytest.raises(type(error)):
        main(["info"])


def test_a_runtime_error_prints_a_traceback_from_the_command_line(tmp_path):
    # A real process: what a user sees when a command fails for a reason that is not theirs.
    script = ("import sys, ldmclip.cli.info as info\n"
              "def run(args): raise RuntimeError('NCCL error: unhandled system error')\n"
              "info.run = run\n"
              "from ldmclip.cli import main\n"
              "sys.exit(main(['info']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "NCCL error" in done.stderr


def test_a_usage_mistake_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--zeroshot", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "ldmclip eval: error: the following arguments are required: --model (see 'ldmclip eval --help')\n"


def test_an_unknown_option_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--stepz", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("ldmclip train: error: unrecognized arguments: --stepz 3 "
                                       "(see 'ldmclip train --help')\n")


def test_bad_input_deep_in_a_command_is_one_line(tmp_path, capsys):
    # data/table.py's check of a table: a UserError, so one line.
    (tmp_path / "t.csv").write_text("")
    assert main(["pack", str(tmp_path / "t.csv"), "--out", str(tmp_path / "shards"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldmclip pack: error:") and "empty" in err and err.count("\n") == 1
