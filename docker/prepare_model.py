"""Get the model folder ready before the service or the indexer starts (the containers'
entrypoint runs this first).

With the TensorRT backend the engine for the GPU found is built now, before the process that
serves it starts, and cached. Engines are specific to a GPU architecture and a TensorRT
version, so they are built where they run, never shipped in an image. The models volume is
mounted read-only, so the engine is written to a cache folder that mirrors the model folder
with one symbolic link per file, beside the engine files (``export.tensorrt`` names them after
the GPU architecture and TensorRT version). The cache folder is named after the model's
fingerprint: another model gets another folder, and the same model on a restart finds its
engine there and is ready in seconds.

Other backends need nothing built: the model folder is only checked (a readable
``psearch.json``) so that a wrong path fails now with a one-line message.

Prints the model folder to serve on stdout; messages go to stderr. Exit status 2 with a
one-line message when the folder is not a model folder or TensorRT cannot be used here.

::

    python docker/prepare_model.py --model-dir /models/alignps --backend tensorrt \\
        --device cuda --cache-dir /var/cache/psearch/engines
"""

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from export.artifact import ArtifactError, read_model_manifest
from export.cli import UsageError, check_tensorrt_available
from export.runtime import ensure_tensorrt_engines

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")
USER_ERROR = 2
# Hex digits of the fingerprint kept in a cache folder's name: 64 bits tell models apart.
FINGERPRINT_DIGITS = 16


def cache_folder_name(model_name: str, fingerprint: str) -> str:
    """``alignps-0123456789abcdef`` for model ``alignps`` with fingerprint ``sha256:0123...``."""
    digest = fingerprint.removeprefix("sha256:")
    if len(digest) < FINGERPRINT_DIGITS or not re.fullmatch(r"[0-9a-f]+", digest):
        raise ValueError(f"fingerprint must be 'sha256:<hex digest>', got {fingerprint!r}")
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-.") or "model"
    return f"{safe_name}-{digest[:FINGERPRINT_DIGITS]}"


def mirror_model_dir(model_dir: Path, mirror: Path) -> Path:
    """Make ``mirror`` a writable stand-in for ``model_dir``: a symbolic link to each of its
    files, and whatever files were written in ``mirror`` itself (built engines), kept.

    Links whose file left ``model_dir`` are removed; a link is never put in place of a real
    file, so an engine built here wins over one of the same name in ``model_dir``.
    """
    mirror.mkdir(parents=True, exist_ok=True)
    for link in mirror.iterdir():
        if link.is_symlink() and not link.exists():
            link.unlink()
    for source in sorted(model_dir.iterdir()):
        if not source.is_file():
            continue
        link = mirror / source.name
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            continue
        link.symlink_to(source.absolute())
    return mirror


def prepare(model_dir: Path, *, backend: str, device: str, cache_dir: Path) -> Path:
    """The model folder to serve: ``model_dir`` itself, or for the TensorRT backend its mirror
    in ``cache_dir`` holding the engine built for this GPU.

    Raises:
        ArtifactError: ``model_dir`` is not a model folder.
        UsageError: TensorRT was asked for where it cannot run.
    """
    manifest = read_model_manifest(model_dir)
    if backend != "tensorrt":
        return model_dir
    if device != "cuda":
        raise UsageError(
            f"the tensorrt backend runs on an NVIDIA GPU: set PSEARCH_DEVICE=cuda (got {device!r})"
        )
    check_tensorrt_available()
    mirror = mirror_model_dir(
        model_dir, cache_dir / cache_folder_name(manifest.name, manifest.fingerprint)
    )
    log(f"TensorRT engines of {manifest.name} ({manifest.fingerprint[:19]}...) in {mirror}")
    engines = ensure_tensorrt_engines(mirror, manifest)
    log("engines ready: " + ", ".join(f"{name} {path.name}" for name, path in engines.items()))
    return mirror


def log(message: str) -> None:
    print(f"prepare-model: {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="prepare-model", description="Check a model folder and build its TensorRT engine."
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="exported model folder")
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--device", choices=DEVICES, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True, help="writable folder for engines")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # export.tensorrt logs why an engine is (re)built.
    logging.basicConfig(level=logging.INFO, format="prepare-model: %(message)s")
    try:
        model_dir = prepare(
            args.model_dir, backend=args.backend, device=args.device, cache_dir=args.cache_dir
        )
    except (ArtifactError, UsageError) as error:
        print(f"prepare-model: error: {error}", file=sys.stderr)
        return USER_ERROR
    print(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
