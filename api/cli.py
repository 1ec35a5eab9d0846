"""`userllm`: one CLI over the whole system.

Each part registers its own subcommands (a `register(subparsers)` function in the listed
modules), so this file only dispatches. Bad input exits with status 2 and one clear line on
stderr (DESIGN.md, "The CLI").
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = ("training.cli", "training.adapter_cli", "api.generate_cli", "api.store_cli", "api.serve_cli")


class UsageError(Exception):
    """Bad input at the CLI edge: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse prints the whole usage block before an error; the contract is one line.
    Subparsers inherit this class (add_parser uses the parent's type)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="userllm", description="Personalized LLM responses from compact user embeddings.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("userllm: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # One clear line; the message never carries record contents (validators keep it so).
        print(f"userllm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
