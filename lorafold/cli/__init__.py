"""`lorafold` command line. Each subcommand lives in its own module with a `register`.

Building the parser imports no torch: the subcommand modules import their heavy code in
their handlers, so `--help` and `lorafold client ...` start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import sys
from collections.abc import Sequence
from typing import Any

from lorafold import __version__
from lorafold.cli import (
    client_cmd,
    demo_cmd,
    inspect_cmd,
    merge_cmd,
    plan_cmd,
    service_cmd,
    unlearn_cmd,
)
from lorafold.errors import LorafoldError

SUBCOMMANDS = [merge_cmd, plan_cmd, inspect_cmd, demo_cmd, unlearn_cmd, service_cmd, client_cmd]
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lorafold",
        description="Consolidate LoRA adapters: merge many into one, unlearn, serve as a REST API.")
    parser.add_argument("--version", action="version", version=f"lorafold {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


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
    args = build_parser().parse_args(argv)
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
