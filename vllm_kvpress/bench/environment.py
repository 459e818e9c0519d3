"""Owns the record of where and how a benchmark ran: GPU, versions, git commit, command line.

Versions come from package metadata, so the parent process records them without importing vLLM
or torch (which would cost seconds and, for torch, could touch the GPU).
"""

import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

from vllm_kvpress.bench import gpu
from vllm_kvpress.provenance import git_state, package_version


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, quoted so it can be pasted back into a shell."""
    argv = sys.argv if argv is None else argv
    program = Path(argv[0]).name if argv else "vllm-kvpress"
    return shlex.join([program, *argv[1:]])


def describe_environment(device_index: int = 0) -> dict:
    return {
        "gpu_name": gpu.gpu_name(device_index),
        "gpu_memory_total_bytes": gpu.memory_total_bytes(device_index),
        "vllm_version": package_version("vllm"),
        "torch_version": package_version("torch"),
        "transformers_version": package_version("transformers"),
        "vllm_kvpress_version": package_version("vllm-kvpress"),
        "python_version": platform.python_version(),
        # The command runs from the repository root; the installed package may be a copy elsewhere.
        **git_state(Path.cwd()),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
