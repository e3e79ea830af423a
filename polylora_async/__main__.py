"""Command line: ``python -m polylora_async demo`` (also installed as ``polylora-async``)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument in one line on stderr (exit status 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def main(argv: list[str] | None = None) -> int:
    from ._demo import add_demo_arguments, check_demo_arguments, run_demo

    parser = _Parser(prog="polylora-async", description="Multi-LoRA serving inside asyncio.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="serve synthetic PEFT adapters to concurrent clients and verify results",
        description="Serve PEFT adapters to concurrent clients through the runtime and check every result "
        "against a solo PEFT run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_demo_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        # Everything is checked before any work: a bad argument costs no model build.
        try:
            check_demo_arguments(args)
        except ValueError as error:
            demo.error(str(error))
        return run_demo(args)
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
