"""Command line: ``python -m polylora_async demo`` (also installed as ``polylora-async``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from ._demo import add_demo_arguments, run_demo

    parser = argparse.ArgumentParser(prog="polylora-async", description="Multi-LoRA serving inside asyncio.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="serve synthetic PEFT adapters to concurrent clients and verify results")
    add_demo_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
