"""Owns `vllm-kvpress methods`: print the method table."""

from vllm_kvpress.methods.registry import format_methods_table


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("methods", help="list the KV-compression methods and their status")
    p.set_defaults(run=lambda args: print(format_methods_table()))
