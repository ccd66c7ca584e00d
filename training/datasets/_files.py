"""Reading the raw files of the distributed datasets, with errors that say what is missing.

MATLAB files are read with ``scipy.io.loadmat`` and its default options, so values arrive the way
the public loaders know them: a char array is a 1-element string array, a number is a (1, 1)
double, a struct array is a structured ndarray and a cell array is an object ndarray. The helpers
here unwrap those shapes without caring whether a list was saved as a row or a column.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from .base import DatasetError


def require_root(root: str | os.PathLike[str], what: str) -> Path:
    """The dataset root as a Path; ``what`` describes the folder for the error message."""
    path = Path(root)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such folder; expected {what}")
    return path


def require_file(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, which must be a file; ``what`` describes ``root`` for the error."""
    path = root / relative
    if not path.is_file():
        raise DatasetError(f"{root}: no {relative}; is the root {what}?")
    return path


def require_images(folder: Path, file_names: Iterable[str], listed_in: str) -> None:
    """Check that every image file exists, with one directory listing (no decoding, no stat)."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder; expected the images listed in {listed_in}")
    present = set(os.listdir(folder))
    wanted = list(file_names)
    missing = [name for name in wanted if name not in present]
    if missing:
        raise DatasetError(
            f"{folder}: {len(missing)} of the {len(wanted)} images listed in {listed_in} are "
            f"missing, e.g. {', '.join(missing[:3])}"
        )


def read_mat(path: Path) -> dict[str, Any]:
    """All variables of a MATLAB file (the file is known to exist)."""
    try:
        return scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError, NotImplementedError) as error:
        raise DatasetError(f"{path}: not a readable MATLAB file ({error})") from error


def mat_variable(mat: dict[str, Any], path: Path, names: Sequence[str]) -> np.ndarray:
    """The first of ``names`` present in ``mat``; several names exist for formats that drifted."""
    for name in names:
        if name in mat:
            return mat[name]
    found = sorted(key for key in mat if not key.startswith("__"))
    raise DatasetError(f"{path}: no variable {' or '.join(names)} (it holds {found})")


def mat_records(value: np.ndarray) -> list[np.void]:
    """Every struct record inside ``value``, in order, looking through (nested) cell arrays."""
    if value.dtype.names is not None:
        return list(value.ravel())
    if value.dtype == object:
        return [record for cell in value.ravel() for record in mat_records(np.asarray(cell))]
    raise DatasetError(f"expected a MATLAB struct or cell array, got {value.dtype} {value.shape}")


def mat_field(record: np.void, name: str, path: Path) -> Any:
    """One field of a struct record; a missing field means the file is not the expected one."""
    _require_field(record.dtype, name, path)
    return record[name]


def mat_column(value: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Field ``name`` of every record of a struct array (or cell of structs), flat, in order.

    MATLAB's ``[]`` (no records at all) gives an empty column.
    """
    if value.size == 0:
        return np.empty(0, dtype=object)
    if value.dtype.names is not None:
        _require_field(value.dtype, name, path)
        return value[name].ravel()
    records = mat_records(value)
    column = np.empty(len(records), dtype=object)
    column[:] = [mat_field(record, name, path) for record in records]
    return column


def _require_field(dtype: np.dtype, name: str, path: Path) -> None:
    names = dtype.names or ()
    if name not in names:
        raise DatasetError(f"{path}: struct without field {name!r} (its fields: {list(names)})")


def mat_string(value: Any) -> str:
    """A MATLAB char array, however deeply loadmat wrapped it."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise DatasetError(f"expected a MATLAB string, got an array of shape {value.shape}")
        value = value.item()
    return str(value)


def mat_strings(value: np.ndarray) -> list[str]:
    """A cell array of strings (a list of image names), in order."""
    return [mat_string(cell) for cell in value.ravel()]


def mat_numbers(value: Any) -> np.ndarray:
    """A numeric MATLAB array flattened to float64 (an empty array stays empty)."""
    return np.asarray(value, dtype=np.float64).ravel()
