"""`lorafold` command line. Each subcommand lives in its own module with a `register`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lorafold import __version__
from lorafold.cli import client_cmd, demo_cmd, inspect_cmd, merge_cmd, service_cmd, unlearn_cmd
from lorafold.errors import LorafoldError

SUBCOMMANDS = [merge_cmd, inspect_cmd, demo_cmd, unlearn_cmd, service_cmd, client_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafold",
        description="Consolidate LoRA adapters: merge many into one, unlearn, serve as a REST API.")
    parser.add_argument("--version", action="version", version=f"lorafold {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug information")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
