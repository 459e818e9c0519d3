"""Owns `python -m vllm_kvpress.bench [bench|report] ...`: the two benchmark subcommands without
the top-level `vllm-kvpress` command, whose other subcommands may pull in more of the package."""

import argparse
import sys

from vllm_kvpress.bench import cli, report
from vllm_kvpress.cli import run_parsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_kvpress.bench")
    subparsers = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(subparsers)
    report.add_parser(subparsers)
    return run_parsed(parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
