"""The ``ldmclip`` command: one module per sub-command, the shared conventions in ``common``.

Each command module has ``HELP``, ``DESCRIPTION``, ``EPILOG``, ``add_arguments(parser)`` and
``run(args) -> exit status``; ``main`` parses, dispatches and turns a mistake the user can fix into one line.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from . import cache_text, common, dedup, embed, export, index, info, merge, pack, search, serve, train
from . import filter as filter_command  # (not shadowing the builtin filter)
from . import eval as eval_command  # (not shadowing the builtin eval)

__all__ = ["main", "build_parser", "COMMANDS"]

# In the order `ldmclip --help` lists them.
COMMANDS: dict[str, ModuleType] = {
    "info": info, "train": train, "pack": pack, "eval": eval_command, "export": export, "cache-text": cache_text,
    "embed": embed, "dedup": dedup, "filter": filter_command, "merge": merge, "index": index, "search": search,
    "serve": serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = common.Parser(
        prog="ldmclip",
        description="CLIP for latent-diffusion work: train, load OpenCLIP/Hugging Face checkpoints, evaluate, "
                    "and condition LDMs on the text tower.",
        epilog="Run 'ldmclip COMMAND --help' for the options of a command.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        command = commands.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                                      epilog=module.EPILOG, formatter_class=common.HelpFormatter)
        module.add_arguments(command)
        command.set_defaults(func=module.run, command_parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's parser, so the message names the command
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    # Look the run function up at call time (not args.func), so that tests can monkeypatch a command.
    return common.run_command(args.command, COMMANDS[args.command].run, args)


if __name__ == "__main__":
    sys.exit(main())
