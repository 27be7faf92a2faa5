"""The code version a run record names: the commit, a changed tree, or no checkout at all."""
import re
import shutil
import subprocess

import pytest

from mos.lab import run_log

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(path, *args):
    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


def test_code_version_names_the_commit_and_a_changed_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(run_log, "_ROOT", tmp_path)
    assert run_log.code_version() == "unknown (not a git checkout)"
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "a")
    commit = run_log.git("rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert run_log.code_version() == commit
    (tmp_path / "b.py").write_text("untracked files are not the code that ran\n")
    assert run_log.code_version() == commit
    (tmp_path / "a.py").write_text("x = 2\n")
    assert run_log.code_version() == f"{commit} with uncommitted changes"


def test_git_failures_read_as_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(run_log, "_ROOT", tmp_path / "missing")
    assert run_log.git("rev-parse", "HEAD") == ""
