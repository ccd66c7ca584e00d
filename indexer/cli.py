"""``psearch-index``: look into and maintain a gallery from the command line.

    psearch-index stats GALLERY [--json]
    psearch-index search GALLERY QUERY.npy [--top-k 10] [--camera NAME ...] [--since T]
                  [--until T] [--exclude-image ID ...] [--min-similarity S] [--fingerprint FP]
    psearch-index search GALLERY QUERY_IMAGE --model MODEL_DIR [--box X1,Y1,X2,Y2] [...]
    psearch-index remove GALLERY IMAGE_ID [IMAGE_ID ...]
    psearch-index rebuild GALLERY {flat,ivf_flat,ivf_pq,hnsw} [--nlist N] [--nprobe N] [--m M]
                  [--links N] [--ef-construction N] [--ef-search N] ...
    psearch-index add [PATHS ...] --gallery G --model MODEL_DIR [--camera C] [--recursive]
                  [--manifest FILE.csv|.jsonl] [--backend B] [--batch-size N] [--workers N]
                  [--job NAME] [--min-score S] [--max-pixels N] [--max-bytes N]
                  [--engine {local,ray}] [--address A]

``search`` takes a query embedding saved with ``numpy.save`` (shape (D,)); the gallery cannot
check which model made it, so pass ``--fingerprint`` to have that checked. Or it takes a query
image and the model folder (``--model``) that embeds the person in ``--box`` (default: the whole
image is the person crop), as the service does: RoI models embed the box itself
(``embed_boxes``), the others their detection that overlaps it most; the gallery must be the
model's. Errors are one line on stderr, exit status 2.

``add`` runs a model folder (``psearch-export``) over image files, folders and manifests and
stores the persons it finds, creating the gallery if there is none (see indexer/ingest.py);
without ``--min-score``, from the detection threshold the model folder recommends.
``--job NAME`` records the inputs in the gallery: the same command again (or with no PATHS)
resumes, skipping what is done. Exit status 0 when every file was added (or found there
already), 1 when some files were unreadable (listed on stderr), 2 on errors, 130 when
interrupted (the job resumes where it stopped).
"""

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from indexer.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, decode_image
from indexer.index import INDEX_TYPES
from indexer.ingest import DEFAULT_BATCH_SIZE, DEFAULT_WORKERS, IngestSummary, ingest
from indexer.sources import ImageSource, collect_sources
from indexer.store import Gallery, open_gallery_for
from indexer.types import DEFAULT_MIN_SCORE, GalleryError, Hit

PROGRAM = "psearch-index"
# Index parameters `rebuild` takes (indexer/index.py says which index type takes which).
REBUILD_PARAMS = (
    "nlist", "nprobe", "m", "nbits", "train_size", "rerank", "links", "ef_construction", "ef_search"
)  # fmt: skip


class _UsageError(Exception):
    """A command line argparse refused."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the usage and exit
        raise _UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``psearch-index`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    try:
        arguments = _parser().parse_args(argv)
        return arguments.command(arguments)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except (_UsageError, GalleryError, ValueError, OSError) as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROGRAM, description="Look into and maintain a person gallery.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=_Parser)

    stats = commands.add_parser("stats", help="counts and index settings")
    stats.add_argument("gallery", type=Path)
    stats.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(command=_stats)

    search = commands.add_parser("search", help="persons most similar to a query")
    search.add_argument("gallery", type=Path)
    search.add_argument(
        "query", type=Path, help="a .npy embedding of shape (D,), or an image with --model"
    )
    search.add_argument("--model", type=Path, help="model folder that embeds a query image")
    search.add_argument("--box", help="x1,y1,x2,y2: the query person (default: whole image)")
    search.add_argument("--backend", default="auto",
                        choices=("auto", "torch", "onnxruntime", "tensorrt"))  # fmt: skip
    search.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if there is one")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--camera", action="append", help="only images of this camera (repeat)")
    search.add_argument("--since", type=float, help="only images taken at or after (POSIX s)")
    search.add_argument("--until", type=float, help="only images taken at or before (POSIX s)")
    search.add_argument("--exclude-image", type=int, action="append", metavar="ID")
    search.add_argument("--min-similarity", type=float)
    search.add_argument("--fingerprint", help="refuse a gallery of another model")
    search.add_argument("--json", action="store_true", help="print JSON")
    search.set_defaults(command=_search)

    remove = commands.add_parser("remove", help="remove images and their persons")
    remove.add_argument("gallery", type=Path)
    remove.add_argument("image_ids", type=int, nargs="+", metavar="IMAGE_ID")
    remove.set_defaults(command=_remove)

    rebuild = commands.add_parser("rebuild", help="rebuild the index as another type")
    rebuild.add_argument("gallery", type=Path)
    rebuild.add_argument("index_type", choices=INDEX_TYPES)
    for name in REBUILD_PARAMS:
        rebuild.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    rebuild.add_argument("--gpu", action="store_true", help="search on GPU (FAISS GPU build)")
    rebuild.set_defaults(command=_rebuild)

    add = commands.add_parser("add", help="detect the persons of images and add them")
    add.add_argument("paths", nargs="*", metavar="PATH", help="image files and folders")
    add.add_argument("--gallery", type=Path, required=True, help="made if missing")
    add.add_argument("--model", type=Path, required=True, help="exported model folder")
    add.add_argument("--manifest", action="append", default=[], type=Path,
                     help="CSV or JSON lines of path, camera, timestamp (repeat)")  # fmt: skip
    add.add_argument("--camera", help="camera of the images (unless a manifest says)")
    add.add_argument("--recursive", action="store_true", help="also the folders' subfolders")
    add.add_argument("--backend", default="auto",
                     choices=("auto", "torch", "onnxruntime", "tensorrt"))  # fmt: skip
    add.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if there is one")
    add.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    add.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="decoding threads")
    add.add_argument("--min-score", type=float,
                     help="store persons detected with at least this score (default: the model "
                     f"folder's detection_threshold, or {DEFAULT_MIN_SCORE} for folders without "
                     "one)")  # fmt: skip
    add.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                     help="refuse images of more pixels (width x height) than this")  # fmt: skip
    add.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                     help="refuse image files larger than this, unread")  # fmt: skip
    add.add_argument("--job", help="record the ingest as this job; run again to resume")
    add.add_argument("--engine", choices=("local", "ray"), default="local")
    add.add_argument("--address", help="Ray cluster address (--engine ray; default: local)")
    add.add_argument("--actors", type=int, help="model actors (--engine ray; default: GPUs)")
    add.add_argument("--no-progress", action="store_true", help="no progress bar")
    add.set_defaults(command=_add)
    return parser


def _stats(arguments: argparse.Namespace) -> int:
    with Gallery.open(arguments.gallery, fingerprint=None) as gallery:
        stats = asdict(gallery.stats())
    if arguments.json:
        print(json.dumps(stats, indent=2))
    else:
        for name, value in stats.items():
            print(f"{name:>12}: {value}")
    return 0


def _search(arguments: argparse.Namespace) -> int:
    if arguments.model is not None:
        query, fingerprint = _embed_query_image(arguments)
    elif arguments.box is not None:
        raise ValueError("--box needs --model: a query embedding has no image to box")
    else:
        query, fingerprint = np.load(arguments.query, allow_pickle=False), arguments.fingerprint
    if arguments.since is None and arguments.until is None:
        time_range = None
    else:
        time_range = (arguments.since, arguments.until)
    with Gallery.open(arguments.gallery, fingerprint) as gallery:
        hits = gallery.search(
            query,
            arguments.top_k,
            cameras=arguments.camera,
            time_range=time_range,
            exclude_images=arguments.exclude_image,
            min_similarity=arguments.min_similarity,
        )
    if arguments.json:
        print(json.dumps([asdict(hit) for hit in hits], indent=2))
    else:
        _print_hits(hits)
    return 0


def _embed_query_image(arguments: argparse.Namespace) -> tuple[np.ndarray, str]:
    """The embedding of the person in the query image (``--box``, or all of it) by the model
    folder, and the fingerprint the gallery must have (the model's, unless given)."""
    box = None
    if arguments.box is not None:
        try:
            box = [float(value) for value in arguments.box.split(",")]
        except ValueError:
            raise ValueError(f"--box must be x1,y1,x2,y2 numbers, got {arguments.box!r}") from None
    pixels = decode_image(Path(arguments.query).read_bytes())
    engine = _load_engine(arguments)
    fingerprint = arguments.fingerprint or engine.info.fingerprint
    if fingerprint != engine.info.fingerprint:
        raise ValueError(
            f"--fingerprint {fingerprint} is not the fingerprint of the model {arguments.model}"
        )
    return engine.embed_query(pixels, box), fingerprint


def _print_hits(hits: list[Hit]) -> None:
    print(
        f"{'rank':>4} {'similarity':>10} {'image':>7} {'person':>7} {'det':>5}  box / camera / uri"
    )
    for rank, hit in enumerate(hits, start=1):
        box = " ".join(f"{value:.0f}" for value in hit.box)
        print(
            f"{rank:>4} {hit.similarity:>10.4f} {hit.image_id:>7} {hit.person_id:>7} "
            f"{hit.det_score:>5.2f}  [{box}] {hit.camera or '-'} {hit.uri or '-'}"
        )


def _remove(arguments: argparse.Namespace) -> int:
    with Gallery.open(arguments.gallery, fingerprint=None) as gallery:
        for image_id in arguments.image_ids:  # all must exist before any is removed
            gallery.get_image(image_id)
        for image_id in arguments.image_ids:
            persons = gallery.remove_image(image_id)
            print(f"removed image {image_id} ({persons} persons)")
    return 0


def _rebuild(arguments: argparse.Namespace) -> int:
    params = {name: getattr(arguments, name) for name in REBUILD_PARAMS}
    params = {name: value for name, value in params.items() if value is not None}
    if arguments.gpu:
        params["gpu"] = True
    with Gallery.open(arguments.gallery, fingerprint=None) as gallery:
        gallery.rebuild(arguments.index_type, **params)
        stats = gallery.stats()
    print(f"rebuilt {stats.indexed} vectors as {stats.index_type} {stats.index_params}")
    return 0


def _add(arguments: argparse.Namespace) -> int:
    if not (arguments.paths or arguments.manifest or arguments.job):
        raise _UsageError("add: give image files or folders, --manifest, or --job to resume")
    sources = collect_sources(
        arguments.paths,
        manifests=arguments.manifest,
        recursive=arguments.recursive,
        camera=arguments.camera,
    )
    if not sources and not arguments.job:
        raise ValueError("no image files found (folders are listed by image suffix)")
    try:
        summary = _run_ingest(arguments, sources)
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        if arguments.job:
            print(f"{PROGRAM}: run again with --job {arguments.job} to resume", file=sys.stderr)
        return 130
    print(summary.describe())
    for failure in summary.failures:
        print(f"{PROGRAM}: unreadable: {failure.path}: {failure.reason}", file=sys.stderr)
    return 1 if summary.failures else 0


def _run_ingest(arguments: argparse.Namespace, sources: list[ImageSource]) -> IngestSummary:
    options = {
        "batch_size": arguments.batch_size,
        "job": arguments.job,
        "progress": not arguments.no_progress,
        "min_score": arguments.min_score,
        "max_pixels": arguments.max_pixels,
        "max_bytes": arguments.max_bytes,
    }
    if arguments.engine == "ray":
        from indexer.distributed import ingest_ray, model_identity

        identity = model_identity(arguments.model)
        with open_gallery_for(arguments.gallery, identity.fingerprint, identity.dim) as gallery:
            return ingest_ray(
                gallery,
                arguments.model,
                sources,
                backend=arguments.backend,
                actors=arguments.actors,
                address=arguments.address,
                **options,
            )
    engine = _load_engine(arguments)
    info = engine.info
    with open_gallery_for(arguments.gallery, info.fingerprint, info.dim) as gallery:
        return ingest(gallery, engine, sources, workers=arguments.workers, **options)


def _load_engine(arguments: argparse.Namespace):
    import torch  # only for the commands that run models

    from export.runtime import load_engine

    device = arguments.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size = getattr(arguments, "batch_size", DEFAULT_BATCH_SIZE)  # search: one image
    try:
        return load_engine(arguments.model, arguments.backend, device, batch_size=batch_size)
    except (ImportError, RuntimeError) as error:
        raise ValueError(f"cannot load the model {arguments.model}: {error}") from None
