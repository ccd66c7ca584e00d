"""The process the SIGKILL test kills: ingests a fixed stream of synthetic images into a gallery.

    python tests/indexer/crash_child.py GALLERY NUM_IMAGES

Prints "ready" once the gallery is open, then the SHA-256 of every image of a batch after the
batch's transaction committed (one write per batch, so a kill never leaves half a line), and
snapshots every few batches that added something, so that kills also land inside snapshots.
It always starts from the first image: images already stored are skipped by the gallery (keyed
by content hash), which is how an interrupted ingest resumes.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from indexer.store import Gallery
from indexer.types import NewImage

FINGERPRINT = "crash-test-model"
DIM = 16
BATCH_SIZES = (1, 2, 3, 4)  # cycled: single-image and multi-image transactions
SNAPSHOT_EVERY = 5  # batches


def synthetic_image(number: int) -> NewImage:
    """Image ``number`` of the stream: 1 to 3 persons with random unit embeddings."""
    generator = np.random.default_rng(number)
    count = 1 + number % 3
    embeddings = generator.standard_normal((count, DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    corners = generator.uniform(0, 100, (count, 2))
    return NewImage(
        data=f"synthetic image {number}".encode(),
        boxes=np.hstack([corners, corners + 50]),
        scores=generator.uniform(0.5, 1, count),
        embeddings=embeddings,
        width=200,
        height=200,
        camera=f"camera-{number % 4}",
        timestamp=float(number),
    )


def ingest(gallery_path: str, num_images: int) -> None:
    with Gallery.open(gallery_path, FINGERPRINT) as gallery:
        print("ready", flush=True)
        start, batch, added = 0, 0, False
        while start < num_images:
            stop = min(start + BATCH_SIZES[batch % len(BATCH_SIZES)], num_images)
            results = gallery.add_images([synthetic_image(n) for n in range(start, stop)])
            sys.stdout.write("".join(f"{result.sha256}\n" for result in results))
            sys.stdout.flush()
            batch, start = batch + 1, stop
            added |= any(result.added for result in results)
            if batch % SNAPSHOT_EVERY == 0 and added:  # resuming past stored images: no snapshot
                gallery.snapshot()
                added = False


if __name__ == "__main__":
    ingest(sys.argv[1], int(sys.argv[2]))
