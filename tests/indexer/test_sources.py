"""What an ingest reads: paths, folders and manifests; errors name the file and line."""

import json
from datetime import UTC, datetime

import pytest

from indexer.sources import (
    ImageSource,
    SourceError,
    collect_sources,
    parse_timestamp,
    read_image_manifest,
)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def folder(tmp_path):
    """photos/ with b.jpg, a.PNG, notes.txt, .hidden.jpg, ._a.jpg and sub/c.jpeg."""
    root = tmp_path / "photos"
    for name in ("b.jpg", "a.PNG", "notes.txt", ".hidden.jpg", "._a.jpg", "sub/c.jpeg"):
        touch(root / name)
    return root


def test_a_folder_gives_its_images_in_name_order_without_hidden_files(folder):
    sources = collect_sources([folder], camera="gate")
    assert sources == [
        ImageSource(str(folder / "a.PNG"), "gate"),
        ImageSource(str(folder / "b.jpg"), "gate"),
    ]


def test_recursive_adds_the_subfolders_after_the_folder(folder):
    paths = [source.path for source in collect_sources([folder], recursive=True)]
    assert paths == [str(folder / "a.PNG"), str(folder / "b.jpg"), str(folder / "sub/c.jpeg")]


def test_a_named_file_is_taken_whatever_its_suffix_and_each_path_once(folder, monkeypatch):
    monkeypatch.chdir(folder)
    sources = collect_sources(["notes.txt", folder, "b.jpg"])
    # Relative paths become absolute; b.jpg is listed by the folder first, then not again.
    assert [source.path for source in sources] == [
        str(folder / "notes.txt"),
        str(folder / "a.PNG"),
        str(folder / "b.jpg"),
    ]


def test_a_missing_path_is_an_error(tmp_path):
    with pytest.raises(SourceError, match=r"no such file or folder: .*nowhere"):
        collect_sources([tmp_path / "nowhere"])


def test_a_csv_manifest_gives_paths_relative_to_it_cameras_and_timestamps(tmp_path):
    manifest = tmp_path / "lists" / "day.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "path,camera,timestamp\n"
        "a.jpg,gate,1700000000\n"
        "/data/b.jpg,,2024-05-01T08:30:00+02:00\n"
        "c.jpg,hall,\n"
    )
    sources = read_image_manifest(manifest, camera="default")
    # 08:30 at +02:00 is 06:30 UTC.
    expected_b = datetime(2024, 5, 1, 6, 30, tzinfo=UTC).timestamp()
    assert sources == [
        ImageSource(str(tmp_path / "lists" / "a.jpg"), "gate", 1700000000.0),
        ImageSource("/data/b.jpg", "default", expected_b),
        ImageSource(str(tmp_path / "lists" / "c.jpg"), "hall", None),
    ]


def test_a_json_lines_manifest_reads_the_same_keys(tmp_path):
    manifest = tmp_path / "day.jsonl"
    rows = [
        {"path": "a.jpg", "camera": "gate", "timestamp": 12.5},
        {"path": "b.jpg", "timestamp": "1970-01-01T00:01:00"},  # no offset: UTC, so 60 s
        {"path": "c.jpg", "camera": None},
    ]
    manifest.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert read_image_manifest(manifest) == [
        ImageSource(str(tmp_path / "a.jpg"), "gate", 12.5),
        ImageSource(str(tmp_path / "b.jpg"), None, 60.0),
        ImageSource(str(tmp_path / "c.jpg"), None, None),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.csv", "file,camera\na.jpg,x\n", r"m\.csv:1: the header must name a 'path' column"),
        ("m.csv", "path,cam\na.jpg,x\n", r"m\.csv:1: unknown column\(s\) 'cam'"),
        ("m.csv", "path\na.jpg\nb.jpg,extra\n", r"m\.csv:3: more cells than header columns"),
        ("m.csv", "path,timestamp\na.jpg,1\nb.jpg,yesterday\n", r"m\.csv:3: timestamp 'yest"),
        ("m.csv", "path,camera\n,gate\n", r"m\.csv:2: 'path' must be a non-empty string"),
        ("m.jsonl", '{"path": "a.jpg"}\n{"path": "b.jpg"\n', r"m\.jsonl:2: not valid JSON"),
        ("m.jsonl", '\n["a.jpg"]\n', r"m\.jsonl:2: expected a JSON object"),
        ("m.jsonl", '{"path": "a.jpg", "time": 1}\n', r"m\.jsonl:1: unknown key\(s\) 'time'"),
        ("m.jsonl", '{"path": "a.jpg", "camera": 3}\n', r"m\.jsonl:1: a camera name must be t"),
        ("m.jsonl", '{"path": "a.jpg", "camera": "c\\u0000"}\n', r"m\.jsonl:1: .*U\+0000"),
        ("m.csv", f"path,camera\na.jpg,{'c' * 257}\n", r"m\.csv:2: a camera name has 1 to 256"),
        ("m.jsonl", '{"path": "a.jpg", "timestamp": true}\n', r"m\.jsonl:1: timestamp must be"),
        ("m.jsonl", '{"path": "a.jpg", "timestamp": "nan"}\n', r"m\.jsonl:1: .*must be finite"),
        ("m.txt", "a.jpg\n", r"m\.txt: a manifest is \.csv or JSON lines"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, name, text, message):
    manifest = tmp_path / name
    manifest.write_text(text)
    with pytest.raises(SourceError, match=message):
        read_image_manifest(manifest)


def test_a_csv_with_a_byte_order_mark_reads_its_header(tmp_path):
    manifest = tmp_path / "excel.csv"
    manifest.write_bytes("\ufeffpath,camera\na.jpg,gate\n".encode())
    assert read_image_manifest(manifest) == [ImageSource(str(tmp_path / "a.jpg"), "gate")]


def test_manifests_follow_the_paths_in_collect_sources(tmp_path, folder):
    manifest = tmp_path / "extra.csv"
    manifest.write_text(f"path\n{folder / 'b.jpg'}\nz.jpg\n")
    paths = [s.path for s in collect_sources([folder], manifests=[manifest])]
    assert paths == [str(folder / "a.PNG"), str(folder / "b.jpg"), str(tmp_path / "z.jpg")]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (5, 5.0),
        ("  7.25 ", 7.25),
        ("2000-01-01T00:00:00Z", 946684800.0),  # 30 years and 7 leap days after 1970: 10957 d
        ("2000-01-01 01:00:00+01:00", 946684800.0),
    ],
)
def test_timestamps_are_posix_seconds(value, seconds):
    assert parse_timestamp(value) == seconds
