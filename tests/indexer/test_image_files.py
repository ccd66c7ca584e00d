"""The files a gallery keeps by content hash, and the media type an image is served as."""

import hashlib

import pytest

from indexer.image_files import ImageFiles
from indexer.images import image_media_type
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


def test_a_sweep_removes_unreferenced_files_and_temporaries_and_keeps_the_rest(tmp_path):
    files = ImageFiles(tmp_path / "files")
    kept, orphan = (hashlib.sha256(bytes([n])).hexdigest() for n in (1, 2))
    files.save(kept, b"\x01")
    files.save(orphan, b"\x02")
    # What a kill in the middle of a durable write leaves: a temporary beside its target.
    temporary = files.path(kept).with_name(f".{kept}.0123abcd.tmp")
    temporary.write_bytes(b"half")
    (files.root / "notes").mkdir()  # not one of the 256 folders: left alone

    removed = files.sweep(lambda hashes: {h for h in hashes if h == kept})

    assert removed == 2
    assert files.find(kept) is not None
    assert files.find(orphan) is None
    assert not temporary.exists()
    assert (files.root / "notes").is_dir()


@pytest.mark.parametrize(
    ("image_format", "expected"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")],
)
def test_the_media_type_comes_from_the_header_of_the_bytes_or_the_file(
    tmp_path, image_format, expected
):
    data = encode(scene(2), image_format)
    path = tmp_path / "image"
    path.write_bytes(data)
    assert image_media_type(data) == image_media_type(path) == expected


def test_bytes_that_are_no_image_are_served_as_bytes():
    assert image_media_type(b"hello") == "application/octet-stream"
