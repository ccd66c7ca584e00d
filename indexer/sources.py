"""What an ingest reads: image files given as paths, folders, or listed in a manifest.

A manifest lists one image per row with its camera and capture time:

* CSV with a header row: ``path`` (required), ``camera``, ``timestamp`` (optional columns);
* JSON lines (``.jsonl``, ``.ndjson``): one object per line with the same keys.

Timestamps are POSIX seconds (a number, or a string of one) or ISO 8601 text
(``2024-05-01T08:30:00+02:00``; a time without a UTC offset is taken as UTC). Relative paths in
a manifest are relative to the manifest's folder. Camera names follow the gallery's rule
(``indexer.validation.check_camera``). Errors name the file and line.

A manifest is read as ``common.reading`` reads a file someone else named: a FIFO or a device is
refused rather than waited on, and (``within``) it is reached without following a link out of
the allowed folders.
"""

import csv
import io
import json
import math
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import Any, TextIO

from common.reading import FileRefused, open_regular_file
from indexer.images import IMAGE_SUFFIXES
from indexer.validation import check_camera

MANIFEST_COLUMNS = ("path", "camera", "timestamp")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")


class SourceError(ValueError):
    """A path that does not exist, or a manifest that cannot be read as one."""


@dataclass(frozen=True)
class ImageSource:
    """One image file to ingest: its absolute path, camera and capture time (POSIX seconds)."""

    path: str
    camera: str | None = None
    timestamp: float | None = None


def collect_sources(
    paths: Iterable[str | PathLike] = (),
    *,
    manifests: Iterable[str | PathLike] = (),
    recursive: bool = False,
    camera: str | None = None,
) -> list[ImageSource]:
    """The images named by ``paths`` (files, or folders: the image files in them, in name order;
    with ``recursive`` also in their subfolders) and listed in ``manifests``, in that order,
    each path once (its first mention wins). ``camera`` is the camera of every image whose
    manifest row names none. Raises :class:`SourceError` for a path that does not exist or
    cannot be looked at (a name too long for the file system, a folder that cannot be listed).
    """
    sources: list[ImageSource] = []
    for path in paths:
        sources += (ImageSource(str(file), camera) for file in _image_files(Path(path), recursive))
    for manifest in manifests:
        sources += read_image_manifest(manifest, camera=camera)
    return first_of_each_path(sources)


def _image_files(path: Path, recursive: bool) -> Iterator[Path]:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SourceError(f"no such file or folder: {path}") from None
    except (OSError, ValueError) as error:
        raise SourceError(f"cannot read {path}: {_reason(error)}") from None
    if stat.S_ISDIR(mode):
        yield from _listed_images(path.absolute(), recursive)
    elif stat.S_ISREG(mode):
        yield path.absolute()
    else:
        raise SourceError(f"{path} is neither a file nor a folder (a FIFO, socket or device?)")


def _listed_images(folder: Path, recursive: bool) -> Iterator[Path]:
    """Image files of ``folder`` in name order, then (recursive) those of its subfolders.

    Hidden names are left out: ``._photo.jpg`` files are macOS metadata, not images.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        raise SourceError(f"cannot list folder {folder}: {error.strerror}") from None
    visible = [entry for entry in entries if not entry.name.startswith(".")]
    for entry in visible:
        if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and _is_file(entry):
            yield Path(entry.path)
    if recursive:
        for entry in visible:
            if entry.is_dir(follow_symlinks=False):
                yield from _listed_images(Path(entry.path), recursive)


def _is_file(entry: os.DirEntry) -> bool:
    """Whether a folder entry is a regular file (or a link to one; a broken link is not)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _reason(error: Exception) -> str:
    return (error.strerror if isinstance(error, OSError) else None) or str(error)


def first_of_each_path(sources: Sequence[ImageSource]) -> list[ImageSource]:
    """``sources`` without the repeats of a path (the first mention wins, with its camera and
    time)."""
    seen: set[str] = set()
    unique = []
    for source in sources:
        if source.path not in seen:
            seen.add(source.path)
            unique.append(source)
    return unique


def read_image_manifest(
    path: str | PathLike, *, camera: str | None = None, within: Sequence[str] | None = None
) -> list[ImageSource]:
    """The images a manifest lists (CSV, or JSON lines by suffix), in its order. ``camera`` is
    the camera of rows that name none; ``within``: resolved folders the manifest must lie in
    (see the module). Raises :class:`SourceError` naming the line at fault."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".csv" and suffix not in JSON_LINES_SUFFIXES:
        raise SourceError(
            f"{path}: a manifest is .csv or JSON lines ({', '.join(JSON_LINES_SUFFIXES)}), "
            f"not {suffix or 'a file without suffix'}"
        )
    folder = path.absolute().parent
    try:
        with open_regular_file(path, within) as binary:
            # utf-8-sig reads files with or without a byte order mark.
            text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
            rows = _csv_rows(text, path) if suffix == ".csv" else _json_lines_rows(text, path)
            return [_manifest_source(row, folder, camera, f"{path}:{line}") for line, row in rows]
    except FileNotFoundError:
        raise SourceError(f"no such manifest: {path}") from None
    except FileRefused as error:
        raise SourceError(f"manifest {error}") from None
    except UnicodeDecodeError as error:
        raise SourceError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise SourceError(f"cannot read manifest {path}: {_reason(error)}") from None


def _csv_rows(file: TextIO, path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV manifest."""
    reader = csv.DictReader(file)
    columns = reader.fieldnames or []
    if "path" not in columns:
        raise SourceError(
            f"{path}:1: the header must name a 'path' column (found: {', '.join(columns)})"
        )
    unknown = [column for column in columns if column not in MANIFEST_COLUMNS]
    if unknown:
        raise SourceError(
            f"{path}:1: unknown column(s) {', '.join(map(repr, unknown))}; "
            f"the columns are {', '.join(MANIFEST_COLUMNS)}"
        )
    for row in reader:
        if None in row:  # more cells than header columns
            raise SourceError(f"{path}:{reader.line_num}: more cells than header columns")
        yield reader.line_num, {key: value for key, value in row.items() if value != ""}


def _json_lines_rows(file: TextIO, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON lines manifest; blank lines are skipped."""
    for line_number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SourceError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise SourceError(f"{path}:{line_number}: expected a JSON object, got {line!r}")
        unknown = [key for key in row if key not in MANIFEST_COLUMNS]
        if unknown:
            raise SourceError(
                f"{path}:{line_number}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"the keys are {', '.join(MANIFEST_COLUMNS)}"
            )
        yield line_number, {key: value for key, value in row.items() if value is not None}


def _manifest_source(
    row: dict[str, Any], folder: Path, camera: str | None, where: str
) -> ImageSource:
    path = row.get("path")
    if not isinstance(path, str) or not path:
        raise SourceError(f"{where}: 'path' must be a non-empty string, got {path!r}")
    try:
        row_camera = check_camera(row.get("camera", camera))
        timestamp = parse_timestamp(row.get("timestamp"))
    except ValueError as error:
        raise SourceError(f"{where}: {error}") from None
    return ImageSource(str(folder / path), row_camera, timestamp)


def parse_timestamp(value: Any) -> float | None:
    """POSIX seconds from a number, a string of one, or ISO 8601 text (UTC when it has no
    offset); None stays None. Raises ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"timestamp must be POSIX seconds or ISO 8601 text, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _seconds_from_text(value.strip())
    else:
        raise ValueError(f"timestamp must be POSIX seconds or ISO 8601 text, got {value!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"timestamp must be finite, got {value!r}")
    return seconds


def _seconds_from_text(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"timestamp {text!r} is neither POSIX seconds nor ISO 8601 (2024-05-01T08:30:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
