"""Reading a file someone else named: a regular file, of bounded size, and (``within``) never
through a link out of the allowed folders, even one swapped in after the check."""

import os

import pytest

import common.reading
from common.reading import FileRefused, open_regular_file, read_regular_file, real_path
from tests.hostile_files import fifo, sparse_file


@pytest.fixture
def allowed(tmp_path):
    folder = tmp_path / "allowed"
    (folder / "cam").mkdir(parents=True)
    (folder / "cam" / "frame.png").write_bytes(b"inside")
    return folder


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "frame.png").write_bytes(b"secret")
    return folder


def test_a_regular_file_is_read_whole(allowed):
    path = allowed / "cam" / "frame.png"
    assert read_regular_file(path, max_bytes=6) == b"inside"
    assert read_regular_file(path, max_bytes=6, within=[real_path(allowed)]) == b"inside"


def test_a_fifo_is_refused_at_once_instead_of_waiting_for_a_writer(tmp_path):
    """Opening a FIFO for reading waits for a writer: forever, in a job whose manifest lists
    one (``tests.hostile_files.fifo`` frees such a reader, so that this fails, not hangs)."""
    with fifo(tmp_path / "frame.png") as pipe, pytest.raises(FileRefused) as refused:
        read_regular_file(pipe, max_bytes=1024)
    assert str(refused.value) == f"{pipe} is a FIFO (named pipe), not a regular file"


def test_a_device_is_refused():
    """/dev/zero never ends: read, it would fill the memory."""
    with pytest.raises(FileRefused, match="is a character device, not a regular file"):
        read_regular_file("/dev/zero", max_bytes=1024)


def test_a_folder_is_refused(allowed):
    with pytest.raises(FileRefused, match="is a folder, not a regular file"):
        read_regular_file(allowed, max_bytes=1024)


def test_a_file_over_the_limit_is_refused_from_its_size_without_reading_it(tmp_path):
    """1 GiB, sparse (no disk used): read, it would take 1 GiB of memory."""
    huge = sparse_file(tmp_path / "huge.jpg", 1 << 30)
    with open_regular_file(huge) as file:
        with pytest.raises(FileRefused, match=f"{huge} is 1073741824 bytes; the limit is 4096"):
            common.reading.read_at_most(file, 4096, str(huge))
        assert file.tell() == 0  # not a byte was read


def test_a_file_that_grows_past_the_limit_while_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "growing.jpg"
    path.write_bytes(b"12345678")
    with open_regular_file(path) as file:
        path.write_bytes(b"123456789")  # same inode, one byte more than the size seen
        monkeypatch.setattr(os, "fstat", lambda _: os.stat_result((0,) * 6 + (8,) + (0,) * 3))
        with pytest.raises(FileRefused, match="grew beyond the limit of 8 bytes"):
            common.reading.read_at_most(file, 8, str(path))


def test_outside_the_allowed_folders_is_refused_whichever_way_it_is_reached(
    allowed, outside, tmp_path
):
    (allowed / "shortcut").symlink_to(outside, target_is_directory=True)
    within = [real_path(allowed)]
    for path in (
        outside / "frame.png",
        allowed / ".." / "outside" / "frame.png",
        allowed / "shortcut" / "frame.png",
    ):
        with pytest.raises(FileRefused, match="is outside the allowed roots"):
            read_regular_file(path, max_bytes=1024, within=within)


def test_a_link_inside_the_allowed_folders_is_followed(allowed):
    (allowed / "latest").symlink_to(allowed / "cam", target_is_directory=True)
    path = allowed / "latest" / "frame.png"
    assert read_regular_file(path, max_bytes=1024, within=[real_path(allowed)]) == b"inside"


@pytest.mark.parametrize("swapped", ["folder", "file"])
def test_a_link_swapped_in_between_the_check_and_the_open_is_not_followed(
    allowed, outside, monkeypatch, swapped
):
    """The check resolves the path; the open then walks it without following links. A folder
    (or the file) replaced by a link to outside right after the check is refused, not read."""
    within = [real_path(allowed)]
    checked = common.reading.lies_within

    def check_then_swap(real, folders):
        inside = checked(real, folders)
        if swapped == "folder":
            (allowed / "cam").rename(allowed / "cam.old")
            (allowed / "cam").symlink_to(outside, target_is_directory=True)
        else:
            (allowed / "cam" / "frame.png").unlink()
            (allowed / "cam" / "frame.png").symlink_to(outside / "frame.png")
        return inside

    monkeypatch.setattr(common.reading, "lies_within", check_then_swap)
    with pytest.raises(FileRefused, match="changed while it was opened"):
        read_regular_file(allowed / "cam" / "frame.png", max_bytes=1024, within=within)


def test_a_missing_file_and_a_name_too_long_are_os_errors(allowed):
    within = [real_path(allowed)]
    with pytest.raises(FileNotFoundError):
        read_regular_file(allowed / "cam" / "gone.png", max_bytes=1024, within=within)
    with pytest.raises(OSError, match="File name too long"):
        read_regular_file(allowed / ("x" * 300), max_bytes=1024, within=within)
