"""What every ``ldmclip`` command shares: the option spellings of DESIGN.md's "Command-line conventions"
table (one function per option group, so a meaning is spelled once), the help formatter, the hidden
aliases of old spellings, ``-`` as standard output, and the one place errors are turned into a line."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from typing import Any, Callable, Iterable, Sequence

from ..core.errors import UserError
from ..core.files import write_json_atomic
from ..core.precision import PRECISIONS, canonical_dtype_name

__all__ = ["Parser", "HelpFormatter", "add_hidden_alias", "add_model_options", "add_out_option",
           "add_image_root_option", "add_split_option", "add_column_options", "add_dtype_option",
           "add_precision_option", "add_device_option", "add_quiet_option", "add_workers_option",
           "add_json_option", "add_input_format_option", "parse_sep", "write_json_output", "run_command",
           "ONE_LINE_ERRORS", "STDOUT"]

STDOUT = "-"  # as a path: standard output, in every command
MAX_HELP_WIDTH = 100

# Mistakes a user can fix: shown as one line. Anything else (CUDA out of memory, a shape bug, an NCCL
# failure) keeps its traceback, because only the traceback says where it came from.
ONE_LINE_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                   PermissionError)


class HelpFormatter(argparse.HelpFormatter):
    """Wrapped descriptions, examples as written, and each option's default shown exactly once.

    Lines of a description or epilog that are indented (examples) or end with ``:`` (headings) are kept
    verbatim; every other line is wrapped to the terminal (at most 100 columns)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 30,
                 width: int | None = None) -> None:
        if width is None:
            width = min(MAX_HELP_WIDTH, shutil.get_terminal_size().columns) - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines: list[str] = []
        paragraph: list[str] = []

        def flush() -> None:
            if paragraph:
                lines.append(textwrap.fill(" ".join(paragraph), width, initial_indent=indent,
                                           subsequent_indent=indent))
                paragraph.clear()

        for line in text.splitlines():
            if not line.strip() or line.startswith(" ") or line.rstrip().endswith(":"):
                flush()
                lines.append(indent + line if line.strip() else "")
            else:
                paragraph.append(line.strip())
                if line.rstrip().endswith("."):  # a sentence that ends a line ends its paragraph
                    flush()
        flush()
        return "\n".join(lines)

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        # Identity, not ==: a default of 0 or 1 is worth showing, False/True (a flag) is not.
        if ("default" in help or not action.option_strings or action.required
                or any(default is nothing for nothing in (None, False, True, argparse.SUPPRESS)) or default == []):
            return help
        return f"{help} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the shared formatter; a usage mistake is one line naming the command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_hidden_alias(parser: argparse.ArgumentParser | argparse._ArgumentGroup, old: str | Sequence[str],
                     dest: str, **kwargs: Any) -> None:
    """An old spelling that keeps working but is not shown in ``--help``. It writes the same ``dest``;
    its default is SUPPRESS so that it never overwrites the new option's default."""
    names = [old] if isinstance(old, str) else list(old)
    parser.add_argument(*names, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Option groups (DESIGN.md, "Command-line conventions")


MODEL_HELP = "model: a packaged config (ldmclip info), a JSON config, 'hf-hub:org/repo' or 'local-dir:PATH'"
PRETRAINED_HELP = ("weights: a file (.safetensors/.bin/.pt), a checkpoint folder, 'hf-hub:org/repo' or an OpenCLIP "
                   "pretrained tag of a packaged --model (ViT-L-14 + laion2b_s32b_b82k; all: ldmclip.list_pretrained()) "
                   "(not needed when --model is hf-hub: or local-dir:, which carry their weights)")
TAG_HELP = "or an OpenCLIP pretrained tag of a packaged --model (e.g. laion2b_s32b_b82k; all: ldmclip.list_pretrained())"


def add_model_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, required: bool = False,
                      model_help: str = MODEL_HELP, pretrained_help: str = PRETRAINED_HELP,
                      second: str | None = None) -> None:
    """``--model`` and ``--pretrained`` (``second``: the help of ``--model-2``/``--pretrained-2`` too)."""
    parser.add_argument("--model", required=required, default=None, help=model_help)
    parser.add_argument("--pretrained", default=None, help=pretrained_help)
    if second is not None:
        parser.add_argument("--model-2", default=None, help=second)
        parser.add_argument("--pretrained-2", default=None, help="the second encoder's weights (as --pretrained)")


def add_out_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str, *,
                   required: bool = True, metavar: str = "PATH", aliases: Sequence[str] = ()) -> None:
    """``--out PATH``: where the results go (a folder, or one file where the result is one file)."""
    parser.add_argument("--out", dest="out", required=required, default=None, metavar=metavar, help=help)
    for alias in aliases:
        add_hidden_alias(parser, alias, "out")


def add_image_root_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    """``--images DIR`` (old spelling ``--image-root``)."""
    parser.add_argument("--images", dest="images", metavar="DIR", default=None, help=help)
    add_hidden_alias(parser, "--image-root", "images")


def add_split_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    """``--split FILE`` (old spelling ``--split-file``)."""
    parser.add_argument("--split", dest="split", metavar="FILE", default=None, help=help)
    add_hidden_alias(parser, "--split-file", "split")


def add_column_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                       **columns: tuple[str | None, str]) -> None:
    """``--image-column``, ``--caption-column``, ... given as ``image=(default, help)``."""
    for name, (default, help) in columns.items():
        parser.add_argument(f"--{name}-column", dest=f"{name}_column", default=default, metavar="NAME", help=help)


def _dtype_value(text: str) -> str:
    """``float16`` -> ``fp16``; anything unknown passes through so argparse's choices error names it."""
    try:
        return canonical_dtype_name(text)
    except UserError:
        return text


def add_dtype_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, choices: Iterable[str],
                     default: str, help: str) -> None:
    """``--dtype`` of stored data: fp32|fp16|bf16 (torch's long names are accepted as aliases)."""
    parser.add_argument("--dtype", type=_dtype_value, choices=list(choices), default=default, help=help)


def add_precision_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str | None = None,
                         default: str = "auto") -> None:
    """``--precision auto|fp32|amp_bf16|amp_fp16`` of the compute."""
    parser.add_argument("--precision", choices=list(PRECISIONS), default=default,
                        help=help or "autocast while computing: 'auto' is bf16 on GPUs and on CPUs with "
                                     "AMX/AVX512-bf16, else fp32; fp32 reproduces numbers exactly")


def add_device_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device auto|cpu|cuda|cuda:N``."""
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                        help="'auto': this process's GPU when CUDA is available (cuda:LOCAL_RANK under "
                             "torchrun/srun), else the CPU")


def add_quiet_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                     progress_alias: bool = False) -> None:
    """``--quiet``: no progress bar. ``dest`` is ``quiet``; with ``progress_alias`` the old
    ``--progress yes|no`` sets it too (``no`` = quiet)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    if progress_alias:
        add_hidden_alias(parser, "--progress", "quiet", type=lambda text: not parse_bool(text), metavar="yes|no")


def add_workers_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: int,
                       help: str = "image-decoding worker processes") -> None:
    parser.add_argument("--workers", type=int, default=default, metavar="N", help=help)


def add_json_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str, *,
                    optional_value: bool = False) -> None:
    """``--json PATH|-``: machine-readable output (``-`` = standard output). ``optional_value``: a bare
    ``--json`` means ``-`` (the old flag of ``ldmclip search``)."""
    extra: dict[str, Any] = {"nargs": "?", "const": STDOUT} if optional_value else {}
    parser.add_argument("--json", dest="json", metavar="PATH|-", default=None, help=help, **extra)


def add_input_format_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, choices: Sequence[str],
                            help: str, aliases: Sequence[str] = ()) -> None:
    """``--input-format``: override what an input is (normally detected from the path)."""
    parser.add_argument("--input-format", dest="input_format", choices=list(choices), default="auto", help=help)
    for alias in aliases:
        add_hidden_alias(parser, alias, "input_format", choices=list(choices))


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes/no, got {text!r}")


def parse_sep(sep: str | None) -> str | None:
    """``--sep``: ``'\\t'``, ``tab`` and ``TAB`` typed in a shell mean a tab."""
    if sep is None:
        return None
    return {"\\t": "\t", "tab": "\t", "TAB": "\t"}.get(sep, sep)


def write_json_output(path: str, data: Any) -> None:
    """``--json PATH``: written atomically, or printed when ``path`` is ``-``."""
    if path == STDOUT:
        print(json.dumps(data, indent=1, ensure_ascii=False))
        sys.stdout.flush()
    else:
        write_json_atomic(path, data)


# ----------------------------------------------------------------------------------------------------
# Errors


def _error_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.strerror}: {error.filename}"
    return str(error)


def run_command(command: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a mistake the user can fix becomes one line on stderr and exit status 2."""
    try:
        return run(args)
    except ONE_LINE_ERRORS as error:
        print(f"ldmclip {command}: error: {_error_line(error)}", file=sys.stderr)
        return 2
