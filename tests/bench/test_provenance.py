"""provenance.git_state: which commit a result file names."""

import subprocess

from vllm_kvpress.provenance import GIT_COMMIT_ENV, git_state


def _repo(path):
    def run(*args):
        return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True)

    run("init", "-q")
    (path / "f").write_text("x")
    run("add", "f")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    return run("rev-parse", "HEAD").stdout.strip()


def test_checkout_commit_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    head = _repo(tmp_path)
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": False}
    assert git_state(tmp_path / "missing") == {"git_commit": None, "git_dirty": None}


def test_the_variable_wins_over_a_stale_git_directory(tmp_path, monkeypatch):
    """A copy of the tree sent elsewhere may carry the .git of an older commit than its files."""
    _repo(tmp_path)
    monkeypatch.setenv(GIT_COMMIT_ENV, "8565988")
    assert git_state(tmp_path) == {"git_commit": "8565988", "git_dirty": None}
