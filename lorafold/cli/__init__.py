"""`lorafold` command line. Each subcommand lives in its own module with a `register`.

Building the parser imports no torch: the subcommand modules import their heavy code in
their handlers, so `--help` and `lorafold client ...` start fast. A run imports only the
module of the command it runs (`lorafold merge` never loads the client's HTTP stack or
the service's settings); the other commands appear in `--help` by name and one line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import select
import sys
from collections.abc import Collection, Sequence
from types import ModuleType
from typing import Any

from lorafold import __version__
from lorafold.errors import LorafoldError

# command -> (the module that registers it, its line in `lorafold --help`), in help order.
# The lines are the modules' own (a test checks they agree).
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("merge_cmd", "merge LoRA adapters into one"),
    "plan": ("plan_cmd", "plan which adapters to merge together, and at what rank"),
    "inspect": ("inspect_cmd", "show an adapter's config, modules and validation verdict"),
    "demo": ("demo_cmd", "create synthetic adapters and merge them (no downloads)"),
    "unlearn": ("unlearn_cmd", "remove a constituent, negate an adapter, or unlearn data"),
    "up": ("service_cmd", "run the service locally (Redis, S3, API, workers)"),
    "worker": ("service_cmd", "run job workers (one per GPU, else --workers)"),
    "client": ("client_cmd", "use a running lorafold service"),
}
# What a process killed by SIGPIPE reports in a shell (128 + 13).
BROKEN_PIPE_EXIT = 141


class HelpFormatter(argparse.HelpFormatter):
    """Adds `(default: X)` to an option's help when X is a value (not None, False or
    empty) and the help does not already state a default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (not action.option_strings or default is argparse.SUPPRESS
                or default is None or default is False or default == []
                or "default" in help_text.lower()):
            return action.help
        return f"{help_text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with our HelpFormatter; nested subparsers inherit the class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def command_module(command: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{COMMANDS[command][0]}")


def build_parser(load: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or (`load`) only of those commands, whose modules alone
    are imported; the others are listed by name and help line."""
    parser = Parser(
        prog="lorafold",
        description="Consolidate LoRA adapters: merge many into one, unlearn, serve as a REST API.")
    parser.add_argument("--version", action="version", version=f"lorafold {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {COMMANDS[c][0] for c in (COMMANDS if load is None else load)}
    registered: set[str] = set()
    for command, (module_name, help_line) in COMMANDS.items():
        if module_name not in modules:
            sub.add_parser(command, help=help_line, add_help=False)
        elif module_name not in registered:   # a module registers all of its commands
            command_module(command).register(sub)
            registered.add(module_name)
    return parser


def command_in(argv: Sequence[str]) -> str | None:
    """The command `argv` runs (its first word that is not an option), if it is one."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return word if word in COMMANDS else None


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on it)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no poll, no fileno
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    return False


def _quiet_exit_on_closed_stdout() -> int:
    """`lorafold client list | head`: the reader went away, so stop without a traceback.

    stdout is pointed at /dev/null so that the interpreter's own flush at exit does not
    raise again (the recipe of the Python docs, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE_EXIT


def _run(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = command_in(words)
    args = build_parser(load=[] if command is None else [command]).parse_args(words)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except LorafoldError as e:
        print(f"error: {e.code}: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:  # also after --help: a closed pipe shows here, not in the exit's flush
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # some other pipe broke: a real error, with its traceback
        return _quiet_exit_on_closed_stdout()


if __name__ == "__main__":
    sys.exit(main())
