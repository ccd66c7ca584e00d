"""Uploaded image files kept by content hash."""

import hashlib

import pytest

from server.files import ImageFiles, media_type
from tests.server.support import encode, scene


def test_a_saved_file_is_found_by_its_hash_and_forgotten_on_remove(tmp_path):
    files = ImageFiles(tmp_path / "files")
    data = encode(scene(1))
    digest = hashlib.sha256(data).hexdigest()

    path = files.save(digest, data)

    assert path == tmp_path / "files" / digest[:2] / digest
    assert files.find(digest).read_bytes() == data
    assert files.save(digest, data) == path  # the same bytes are kept once
    assert [p.name for p in path.parent.iterdir()] == [digest]  # no temporary file left
    files.remove(digest)
    assert files.find(digest) is None
    files.remove(digest)  # removing twice is harmless


@pytest.mark.parametrize("name", ["../../etc/passwd", "ABC", "0" * 63, "g" * 64])
def test_names_that_are_not_sha256_digests_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="SHA-256"):
        ImageFiles(tmp_path).path(name)


@pytest.mark.parametrize(
    ("image_format", "expected"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")],
)
def test_the_media_type_comes_from_the_file_header(tmp_path, image_format, expected):
    path = tmp_path / "image"
    path.write_bytes(encode(scene(2), image_format))
    assert media_type(path) == expected


def test_a_file_that_is_no_image_is_served_as_bytes(tmp_path):
    path = tmp_path / "notes"
    path.write_bytes(b"hello")
    assert media_type(path) == "application/octet-stream"
