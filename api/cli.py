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
COMMAND_MODULES = ("api.train_cli", "api.adapter_cli", "api.generate_cli", "api.store_cli", "api.serve_cli")


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


def expected_failure(err: BaseException) -> str | None:
    """The one-line message of an expected failure (bad input, a missing file or key, a store
    that refuses to open or does not authenticate, an unreachable or locked database); None for
    a bug, which keeps its traceback. Messages never carry record contents (validators keep it
    so); a database error keeps only its driver's first line, never the statement or values."""
    if isinstance(err, (UsageError, ValueError, LookupError, OSError)):
        return str(err) or type(err).__name__
    module = type(err).__module__
    if module.startswith("store"):
        from store.errors import StoreError

        if isinstance(err, StoreError):
            return str(err)
    if module.startswith("sqlalchemy"):
        from sqlalchemy.exc import IntegrityError, OperationalError

        first = (str(getattr(err, "orig", None) or "").strip().splitlines() or [type(err).__name__])[0]
        if isinstance(err, OperationalError):
            return f"database unavailable or locked: {first}"
        if isinstance(err, IntegrityError):
            return f"database refused the write (altered data, or a concurrent writer): {first}"
        return f"database error: {first}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("userllm: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = expected_failure(err)
        if message is None:
            raise
        name = " ".join(filter(None, (args.command, getattr(args, "admin_command", None))))
        print(f"userllm {name}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
