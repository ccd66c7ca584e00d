"""``psearch-index``: look into and maintain a gallery from the command line.

    psearch-index stats GALLERY [--json]
    psearch-index search GALLERY QUERY.npy [--top-k 10] [--camera NAME ...] [--since T]
                  [--until T] [--exclude-image ID ...] [--min-similarity S] [--fingerprint FP]
    psearch-index remove GALLERY IMAGE_ID [IMAGE_ID ...]
    psearch-index rebuild GALLERY {flat,ivf_flat,ivf_pq} [--nlist N] [--nprobe N] [--m M] ...

``search`` takes a query embedding saved with ``numpy.save`` (shape (D,)); the gallery cannot
check which model made it, so pass ``--fingerprint`` to have that checked. Errors are one line
on stderr, exit status 2.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from indexer.index import INDEX_TYPES
from indexer.store import Gallery
from indexer.types import GalleryError, Hit

PROGRAM = "psearch-index"


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

    search = commands.add_parser("search", help="persons most similar to an embedding")
    search.add_argument("gallery", type=Path)
    search.add_argument("query", type=Path, help="query embedding, a .npy file of shape (D,)")
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
    for name in ("nlist", "nprobe", "m", "nbits", "train_size", "rerank"):
        rebuild.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    rebuild.add_argument("--gpu", action="store_true", help="search on GPU (FAISS GPU build)")
    rebuild.set_defaults(command=_rebuild)
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
    query = np.load(arguments.query, allow_pickle=False)
    if arguments.since is None and arguments.until is None:
        time_range = None
    else:
        time_range = (arguments.since, arguments.until)
    with Gallery.open(arguments.gallery, arguments.fingerprint) as gallery:
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
    names = ("nlist", "nprobe", "m", "nbits", "train_size", "rerank")
    params = {name: getattr(arguments, name) for name in names}
    params = {name: value for name, value in params.items() if value is not None}
    if arguments.gpu:
        params["gpu"] = True
    with Gallery.open(arguments.gallery, fingerprint=None) as gallery:
        gallery.rebuild(arguments.index_type, **params)
        stats = gallery.stats()
    print(f"rebuilt {stats.indexed} vectors as {stats.index_type} {stats.index_params}")
    return 0
