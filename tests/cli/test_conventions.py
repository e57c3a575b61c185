"""One spelling per meaning (DESIGN.md's conventions), the old spellings as aliases into the same place,
and ``-`` as standard output."""

from __future__ import annotations

import json

import pytest

from ldmclip.cli import build_parser
from ldmclip.cli.common import write_json_output
from ldmclip.cli.train import config_from_args


def _parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


def test_train_out_and_quiet_with_their_old_spellings():
    assert config_from_args(_parse("train", "--out", "runs/a")).output == "runs/a"
    assert config_from_args(_parse("train", "--output", "runs/b")).output == "runs/b"
    assert config_from_args(_parse("train")).output is None
    assert config_from_args(_parse("train", "--quiet")).progress is False
    assert config_from_args(_parse("train", "--progress", "no")).progress is False
    assert config_from_args(_parse("train", "--progress", "yes")).progress is True
    assert config_from_args(_parse("train")).progress is True
    assert config_from_args(_parse("train", "--image-root", "im", "--split-file", "s.txt")).images == "im"


def test_pack_out_images_and_split_with_their_old_spellings():
    new = _parse("pack", "t.csv", "--out", "shards", "--images", "im", "--split", "s.txt")
    old = _parse("pack", "t.csv", "shards", "--image-root", "im", "--split-file", "s.txt")
    assert (new.out, new.legacy_out, new.images, new.split) == ("shards", None, "im", "s.txt")
    assert (old.out, old.legacy_out, old.images, old.split) == (None, "shards", "im", "s.txt")


def test_pack_without_an_output_is_one_line(tmp_path, capsys):
    from ldmclip.cli import main

    (tmp_path / "t.csv").write_text("image,caption\na.jpg,a cat\n")
    assert main(["pack", str(tmp_path / "t.csv")]) == 2
    assert capsys.readouterr().err.strip() == "ldmclip pack: error: pass --out DIR: the folder to write the shards to"


def test_eval_json_with_out_as_its_old_spelling():
    assert _parse("eval", "--model", "m", "--json", "r.json").json == "r.json"
    assert _parse("eval", "--model", "m", "--out", "r.json").json == "r.json"
    assert _parse("eval", "--model", "m").json is None


def test_search_json_takes_a_path_or_nothing():
    assert _parse("search", "idx", "a cat", "--json").json == "-"
    assert _parse("search", "idx", "a cat", "--json", "hits.json").json == "hits.json"
    assert _parse("search", "idx", "a cat").json is None


@pytest.mark.parametrize("spelling, stored", [("fp16", "fp16"), ("float16", "fp16"), ("float32", "fp32")])
def test_dtype_accepts_torch_names_as_aliases(spelling, stored):
    assert _parse("index", "photos", "--out", "i", "--model", "m", "--dtype", spelling).dtype == stored
    assert _parse("cache-text", "c.txt", "--out", "c", "--preset", "sd2", "--dtype", spelling).dtype == stored


def test_unknown_dtype_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse("index", "photos", "--out", "i", "--model", "m", "--dtype", "int8")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "invalid choice: 'int8'" in err
    assert err.count("\n") == 1 and err.startswith("ldmclip index: error:")


def test_cache_text_input_format_with_format_as_its_old_spelling():
    base = ("cache-text", "c.txt", "--out", "c", "--preset", "sd2")
    assert _parse(*base, "--input-format", "table").input_format == "table"
    assert _parse(*base, "--format", "text").input_format == "text"
    assert _parse(*base).input_format == "auto"


def test_device_defaults_to_auto_everywhere():
    for argv in (("eval", "--model", "m"), ("index", "p", "--out", "i", "--model", "m"), ("search", "i", "q"),
                 ("serve", "i"), ("cache-text", "c.txt", "--out", "c", "--preset", "sd2")):
        assert _parse(*argv).device == "auto", argv


def test_json_output_dash_is_stdout_and_a_path_is_a_file(tmp_path, capsys):
    write_json_output("-", {"a": [1, 2]})
    assert json.loads(capsys.readouterr().out) == {"a": [1, 2]}
    write_json_output(str(tmp_path / "sub" / "r.json"), {"b": "é"})
    assert json.loads((tmp_path / "sub" / "r.json").read_text(encoding="utf-8")) == {"b": "é"}
    assert not (tmp_path / "-").exists()


def test_eval_json_dash_puts_only_the_json_on_stdout(tmp_path, capsys, monkeypatch):
    import ldmclip
    from PIL import Image

    from ldmclip.cli import main

    ldmclip.create_model("ViT-Tiny-64").save_pretrained(tmp_path / "model")
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 60, 220))):
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), colour).save(tmp_path / "classes" / name / f"{i}.png")
    monkeypatch.chdir(tmp_path)  # a file named '-' would land here
    code = main(["eval", "--model", f"local-dir:{tmp_path / 'model'}", "--zeroshot", str(tmp_path / "classes"),
                 "--templates", "simple", "--precision", "fp32", "--workers", "0", "--json", "-"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads(captured.out)  # nothing but the JSON
    assert results["zeroshot"]["num_images"] == 4 and results["zeroshot"]["num_classes"] == 2
    assert "zero-shot classification" in captured.err  # the table went to stderr
    assert not (tmp_path / "-").exists() and "results written" not in captured.err


def test_a_train_config_file_may_spell_the_run_folder_like_the_flag(tmp_path):
    (tmp_path / "run.yaml").write_text("out: runs/from-file\nsteps: 7\n")
    cfg = config_from_args(_parse("train", "--config", tmp_path / "run.yaml"))
    assert cfg.output == "runs/from-file" and cfg.steps == 7
    flag_wins = config_from_args(_parse("train", "--config", tmp_path / "run.yaml", "--out", "runs/flag"))
    assert flag_wins.output == "runs/flag"


@pytest.mark.parametrize("command, required", [
    ("train", []), ("eval", ["--model", "m", "--zeroshot", "d"]), ("pack", ["t.csv", "--out", "o"]),
    ("index", ["d", "--out", "o", "--model", "m"]), ("cache-text", ["c.txt", "--out", "o", "--preset", "sd2"]),
])
def test_every_command_with_a_progress_bar_takes_quiet(command, required):
    args = build_parser().parse_args([command, *required, "--quiet"])
    assert getattr(args, "quiet", None) is True or getattr(args, "progress", None) is False
