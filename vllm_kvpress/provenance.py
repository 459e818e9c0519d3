"""Owns what every result file records about where it came from: the git commit and package versions."""

import os
import subprocess
from importlib import metadata
from pathlib import Path

GIT_COMMIT_ENV = "KVPRESS_GIT_COMMIT"
"""Names the commit of a copy of the working tree on another machine; when set it wins over any
.git found there, which may belong to another commit than the files."""


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state(repo_dir: Path) -> dict[str, str | bool | None]:
    """`$KVPRESS_GIT_COMMIT` if set, else the commit and dirtiness of the checkout in `repo_dir`, else None."""
    named = os.environ.get(GIT_COMMIT_ENV)
    if named:
        return {"git_commit": named, "git_dirty": None}

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
        return {"git_commit": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}
