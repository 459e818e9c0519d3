"""Owns what every result file records about where it came from: the git commit and package versions."""

import os
import subprocess
from importlib import metadata
from pathlib import Path

GIT_COMMIT_ENV = "KVPRESS_GIT_COMMIT"
"""Set it where the checkout has no .git (a copy of the working tree on another machine)."""


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


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
