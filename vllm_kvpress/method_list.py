"""Owns `vllm-kvpress methods [NAME]`: the methods table (the package's own methods, those other
packages add through the `vllm_kvpress.methods` entry points, and the papers still planned), or
one method's settings with their defaults."""

import json


def _run(args) -> int:
    from vllm_kvpress.config import load_method_config
    from vllm_kvpress.methods.registry import format_methods_table

    if args.name is None:
        print(format_methods_table())
        return 0
    method = load_method_config({"method": args.name})
    info = method.info
    print(f"{info.name}: {info.paper}" + (f" (arXiv {info.arxiv})" if info.arxiv else ""))
    print(f"  {info.summary}")
    if not method.runs_on_vllm:
        print(f"  status: {info.status.value} (vllm serve refuses it until its vLLM path passes its GPU tests; "
              f"vllm-kvpress eval --engine reference runs it)")
    print("defaults (--kv-compression-config, or --config of eval, overrides any of them):")
    for key, value in method.to_dict().items():
        if key != "method":
            print(f"  {key}: {json.dumps(value)}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("methods", help="list the KV-compression methods, or one method's settings")
    p.add_argument("name", nargs="?", default=None, help="a method: print its settings and their defaults")
    p.set_defaults(run=_run)
