"""The code version a run record names: the commit, a changed tree, no checkout of its own, or
what whoever started the job says."""
import re
import shutil
import subprocess

import pytest

from mos.lab import run_log

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A checkout to read the version of; the per-process cache cleared before and after."""
    monkeypatch.delenv(run_log.CODE_VERSION_VARIABLE, raising=False)
    monkeypatch.setattr(run_log, "_ROOT", tmp_path)
    run_log.code_version.cache_clear()
    yield tmp_path
    run_log.code_version.cache_clear()


def _git(path, *args):
    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
                    *args], check=True, capture_output=True)


def _version():
    run_log.code_version.cache_clear()
    return run_log.code_version()


def test_code_version_names_the_commit_and_a_changed_tree(root):
    assert _version() == "unknown (not a git checkout)"
    _git(root, "init", "-q")
    (root / "a.py").write_text("x = 1\n")
    _git(root, "add", "a.py")
    _git(root, "commit", "-q", "-m", "a")
    commit = run_log.git("rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert _version() == commit
    (root / "b.py").write_text("untracked files are not counted\n")
    assert _version() == commit
    (root / "a.py").write_text("x = 2\n")
    assert _version() == f"{commit} with uncommitted changes"
    # Read once per process: a change after the first call is not seen until the cache is cleared.
    _git(root, "commit", "-q", "-am", "b")
    assert run_log.code_version() == f"{commit} with uncommitted changes"
    assert _version() == run_log.git("rev-parse", "HEAD") != commit


def test_a_copy_inside_another_repository_is_no_checkout(root, monkeypatch):
    """An installed copy (site-packages of a venv inside a checkout) must not name that checkout's commit."""
    _git(root, "init", "-q")
    (root / "a.py").write_text("x = 1\n")
    _git(root, "add", "a.py")
    _git(root, "commit", "-q", "-m", "a")
    (root / "site-packages").mkdir()
    monkeypatch.setattr(run_log, "_ROOT", root / "site-packages")
    assert _version() == "unknown (not a git checkout)"
    assert run_log.git("rev-parse", "HEAD") == "", "the profile's provenance asks git() too"


def test_the_starter_can_name_the_code(root, monkeypatch):
    monkeypatch.setenv(run_log.CODE_VERSION_VARIABLE, "abc123 (copied tree)")
    assert _version() == "abc123 (copied tree)"


def test_git_failures_read_as_empty(root, monkeypatch):
    monkeypatch.setattr(run_log, "_ROOT", root / "missing")
    assert run_log.git("rev-parse", "HEAD") == ""
