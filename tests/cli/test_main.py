"""The ``ldmclip`` command line."""

from __future__ import annotations

import subprocess
import sys

from ldmclip.cli import main


def test_info_lists_packaged_models_with_parameter_counts(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("ViT-")}
    assert rows["ViT-B-16"][0] == "149.62"
    assert rows["ViT-L-14"][0] == "427.62"
    assert rows["ViT-H-14"][0] == "986.11"
    assert rows["ViT-bigG-14"][0] == "2539.57"
    assert "ViT-L-14-quickgelu" in rows and "ViT-Tiny-64" in rows


def test_info_of_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "ViT-Nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'ViT-Nope'" in err and "ViT-B-16" in err
    assert "Traceback" not in err


def test_python_dash_m_entry_point_and_help():
    result = subprocess.run([sys.executable, "-m", "ldmclip", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("info", "train", "pack"):
        assert command in result.stdout


def test_train_with_missing_data_file_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nope.csv"), "--images", str(tmp_path), "--out",
                 str(tmp_path / "run"), "--model", "ViT-Tiny-64", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.csv" in err and "Traceback" not in err
