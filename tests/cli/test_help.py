"""Every ``--help`` renders cleanly: no argparse internals or Python dicts, wrapped text, one default each."""

from __future__ import annotations

import argparse

import pytest

from ldmclip.cli import COMMANDS, build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _outside_examples(text: str) -> list[str]:
    """The lines of a help text, less the indented lines of its 'examples:' block (commands stay whole)."""
    lines, in_examples = [], False
    for line in text.splitlines():
        if line.strip() == "examples:":
            in_examples = True
        elif in_examples and (line.startswith(" ") or not line.strip()):
            continue
        else:
            in_examples = False
            lines.append(line)
    return lines


@pytest.fixture(params=[200, 80])
def wide_terminal(monkeypatch, request):
    # 200 columns: descriptions must still be wrapped (at 100); 80: the usual default.
    monkeypatch.setenv("COLUMNS", str(request.param))


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_renders_cleanly(command, wide_terminal):
    parser = build_parser()
    if command is not None:
        parser = _subparsers(parser)[command]
    text = parser.format_help()
    assert "option_strings" not in text and "{'" not in text and "dict(" not in text
    long_lines = [line for line in _outside_examples(text) if len(line) > 100]
    assert not long_lines, long_lines
    for entry in text.split("\n  -"):  # one option (with its wrapped help) per entry
        assert entry.count("(default:") <= 1, entry


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_with_a_default_shows_it_once(command):
    parser = _subparsers(build_parser())[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or not action.option_strings:
            continue
        text = formatter._expand_help(action)
        assert text.count("default") <= 1, (action.option_strings, text)
        shows_default = action.default is not None and not isinstance(action.default, bool) \
            and action.default is not argparse.SUPPRESS
        if shows_default:
            assert "default" in text, (action.option_strings, text)


def test_train_help_has_the_percent_sign_and_its_defaults():
    text = _subparsers(build_parser())["train"].format_help()
    assert "~30% slower" in text  # an unescaped % once printed a Python dict here
    assert "(default: runs/<model>-<timestamp>)" in " ".join(text.split())
    assert "(default: None)" not in text


def test_export_examples_are_one_per_line_and_dtype_has_its_default():
    text = " ".join(_subparsers(build_parser())["export"].format_help().split())
    assert "dtype of the written weights (default: fp32)" in text
    lines = _subparsers(build_parser())["export"].format_help().splitlines()
    commands = [line for line in lines if line.strip().startswith("ldmclip export")]
    assert len(commands) == 5
    assert all(line.count("ldmclip export") == 1 for line in commands)


def test_old_spellings_are_hidden():
    parsers = _subparsers(build_parser())
    hidden = {"train": ["--output", "--progress", "--image-root", "--split-file"], "pack": ["--image-root",
              "--split-file", "legacy_out"], "eval": ["--out "], "cache-text": ["--format"]}
    for command, spellings in hidden.items():
        text = parsers[command].format_help()
        for spelling in spellings:
            assert spelling not in text, (command, spelling)
