"""`mos.lab.files`: whole files only from any number of concurrent writers (`write_atomic`), whole
lines only from concurrent appenders (`append_line`)."""
import json
import multiprocessing
import os
import stat

import pytest

from mos.lab import files


def _write_many(path, marker, count):
    for _ in range(count):
        files.write_atomic(path, marker * 50_000)


def test_concurrent_writers_to_one_path_never_fail_or_interleave(tmp_path):
    """Four processes write one path 40 times each: none fails, the file always ends whole (one
    writer's text, not a mix), and no temporary file is left."""
    path = tmp_path / "record.json"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(path, marker, 40)) for marker in "abcd"]
    for writer in writers:
        writer.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        if path.exists():
            text = path.read_text()
            assert len(text) == 50_000 and len(set(text)) == 1
            seen.add(text[0])
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert path.read_text() in {m * 50_000 for m in "abcd"}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_text_bytes_and_a_writing_function(tmp_path):
    files.write_atomic(tmp_path / "a.txt", "text")
    files.write_atomic(tmp_path / "b.bin", b"\x00\x01")
    files.write_atomic(tmp_path / "c" / "d.bin", lambda stream: stream.write(b"xyz"), binary=True)
    assert (tmp_path / "a.txt").read_text() == "text" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "c" / "d.bin").read_bytes() == b"xyz"
    # The permissions open() would give, not mkstemp's owner-only ones.
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    assert mode == 0o666 & ~files._UMASK


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    files.write_atomic(path, "old")

    def fail(stream):
        stream.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.write_atomic(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def _append_many(path, writer, count):
    for index in range(count):
        files.append_line(path, json.dumps({"writer": writer, "index": index, "pad": "x" * 20_000}))


def test_concurrent_appends_never_mix_lines(tmp_path):
    """Three processes append 30 lines of 20 kB each to one results file: every line is one
    whole record, none lost, none doubled."""
    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(path, writer, 30)) for writer in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["writer"], r["index"]) for r in records) == [(w, i) for w in range(3) for i in range(30)]


def test_a_killed_writer_s_temporary_file_is_found_and_removed(tmp_path, monkeypatch):
    """What a writer killed between writing and renaming leaves (its real temporary name, caught
    here by failing the rename and skipping the cleanup) is what remove_leftovers deletes; the
    target and a neighbour's temporary file stay."""
    target, neighbour = tmp_path / "run.npz", tmp_path / "run.json"
    target.write_text("old")
    files.write_atomic(neighbour, "whole")
    left = []

    def killed(source, destination):
        left.append(source)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "replace", killed)
        patch.setattr(files.os, "unlink", lambda path: None)
        for writer_path in (target, target, neighbour):
            with pytest.raises(KeyboardInterrupt):
                files.write_atomic(writer_path, "new")
    assert all(os.path.exists(path) for path in left) and len(set(left)) == 3
    assert files.remove_leftovers(target) == 2
    assert [os.path.exists(path) for path in left] == [False, False, True]
    assert target.read_text() == "old" and neighbour.read_text() == "whole"
