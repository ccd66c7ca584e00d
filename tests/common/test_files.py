"""The durable atomic write: the old file or the new one, whole, never a mixture or a leftover."""

import os
import stat

import pytest

from common.files import (
    remove_leftover_temporaries,
    write_atomically,
    write_bytes_atomically,
    write_text_atomically,
)


def test_the_new_content_replaces_the_old(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old")
    write_text_atomically(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["file.txt"]  # no temporary file is left behind


def test_missing_folders_are_made(tmp_path):
    path = tmp_path / "a" / "b" / "file.bin"
    assert write_bytes_atomically(path, b"\x00\x01") == path
    assert path.read_bytes() == b"\x00\x01"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old")

    def half_write(temporary):
        temporary.write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_atomically(path, half_write)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_the_writer_gets_a_file_of_its_own_beside_the_target(tmp_path):
    seen = []

    def write(temporary):
        seen.append(temporary)
        assert temporary.exists() and temporary.parent == tmp_path and temporary.name[0] == "."
        temporary.write_text("x")

    write_atomically(tmp_path / "a.txt", write)
    write_atomically(tmp_path / "a.txt", write)
    assert seen[0] != seen[1]


def test_a_new_file_gets_the_permissions_of_any_new_file(tmp_path):
    mask = os.umask(0o022)
    try:
        write_text_atomically(tmp_path / "shared.json", "{}")
    finally:
        os.umask(mask)
    # Readable by others, as a plain write makes it: model folders and galleries are deployed.
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644


def test_temporaries_a_crash_left_can_be_removed_by_the_one_writer(tmp_path):
    target = tmp_path / "vectors.faiss"
    target.write_bytes(b"index")
    (tmp_path / ".vectors.faiss.0123abcd.tmp").write_bytes(b"half an index")
    (tmp_path / ".other.0123abcd.tmp").write_bytes(b"another file's")
    assert remove_leftover_temporaries(target) == 1
    assert sorted(os.listdir(tmp_path)) == [".other.0123abcd.tmp", "vectors.faiss"]
