"""Owns the `vllm-kvpress` command: `methods`, `model`, `eval`, `agree`, `bench`, `report`, `soak`,
`retrieval-heads`, `key-errors`, `convert`.

Each subcommand's module registers its own parser through `add_parser(subparsers)` and sets
`run`; those modules keep vLLM, torch and transformers imports inside `run`, so building the
parser (and `vllm-kvpress methods`) stays instant.
"""

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = {
    "methods": "vllm_kvpress.method_list",
    "model": "vllm_kvpress.models",
    "eval": "vllm_kvpress.eval.cli",
    "agree": "vllm_kvpress.eval.agreement",
    "bench": "vllm_kvpress.bench.cli",
    "report": "vllm_kvpress.bench.report",
    "soak": "vllm_kvpress.soak.cli",
    "retrieval-heads": "vllm_kvpress.eval.retrieval_heads",
    "key-errors": "vllm_kvpress.eval.key_errors",
    "convert": "vllm_kvpress.convert.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-kvpress", description="Compressed KV-cache pages for vLLM: methods, models, eval, bench."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMAND_MODULES.values():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def run_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the subcommand `args` selects; a bad input (`InputError`, a method not implemented)
    is the user's to fix: reported as argparse reports a bad flag, by the subcommand's parser
    (its usage, one `PROG CMD: error: ...` line, exit status 2), never as a traceback."""
    from vllm_kvpress.errors import InputError, MethodNotImplementedError

    try:
        return int(args.run(args) or 0)
    except (InputError, MethodNotImplementedError) as e:
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command.choices[args.command].error(str(e))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_parsed(parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
