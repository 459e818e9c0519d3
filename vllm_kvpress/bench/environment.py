"""Owns the record of where and how a benchmark ran: GPU, versions, git commit, command line.

Versions come from package metadata, so the parent process records them without importing vLLM
or torch (which would cost seconds and, for torch, could touch the GPU).
"""

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from vllm_kvpress.bench import gpu


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


GIT_COMMIT_ENV = "KVPRESS_GIT_COMMIT"
"""Set it where the checkout has no .git (the GPU machine gets a copy of the working tree)."""


def git_state(repo_dir: Path) -> dict[str, str | bool | None]:
    """Commit and dirtiness of the checkout in `repo_dir`, else `$KVPRESS_GIT_COMMIT`, else None."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": os.environ.get(GIT_COMMIT_ENV), "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


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
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
