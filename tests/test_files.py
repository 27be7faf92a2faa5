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
