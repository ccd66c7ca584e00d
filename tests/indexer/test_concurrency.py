"""Searches running in other threads while images are added never see half an image."""

import threading

import numpy as np

from indexer.types import NewImage
from tests.indexer.conftest import EVERY_CREATABLE_INDEX

PERSONS_PER_IMAGE = 3
NUM_IMAGES = 120


@EVERY_CREATABLE_INDEX
def test_searches_during_adds_see_whole_images_and_only_committed_ones(gallery, random_embeddings):
    """Each image holds 3 persons with one shared embedding, distinct between images. Searching
    that embedding for the top 3 returns the 3 persons of the image once it is visible (each at
    similarity 1, above every other vector), and none of them before: 1 or 2 would be half an
    image. Fewer than 3 hits would mean the index held persons whose rows were not committed
    (their hits cannot be resolved), since every committed image brings 3 persons."""
    embeddings = random_embeddings(NUM_IMAGES, seed=3)
    gallery.add_images([image_of(0, embeddings[0])])
    being_added = [0]  # the image the writer is adding now
    done = threading.Event()
    failures: list[str] = []

    def writer() -> None:
        try:
            for number in range(1, NUM_IMAGES):
                being_added[0] = number
                gallery.add_images([image_of(number, embeddings[number])])
                # Read-your-writes: once add_images returns, the image is searchable.
                if persons_of(gallery.search(embeddings[number], 3), number + 1) != 3:
                    failures.append(f"image {number} not searchable after add returned")
        finally:
            done.set()

    def searcher() -> None:
        while not done.is_set():
            number = being_added[0]
            hits = gallery.search(embeddings[number], PERSONS_PER_IMAGE)
            if len(hits) != PERSONS_PER_IMAGE:
                failures.append(f"{len(hits)} hits: uncommitted persons were in the index")
            if persons_of(hits, number + 1) not in (0, PERSONS_PER_IMAGE):
                failures.append(f"image {number} seen with {persons_of(hits, number + 1)} persons")

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=searcher) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures[:5]
    assert gallery.stats().num_persons == gallery.stats().indexed == NUM_IMAGES * PERSONS_PER_IMAGE


def image_of(number: int, embedding: np.ndarray) -> NewImage:
    return NewImage(
        data=f"concurrent {number}".encode(),
        boxes=np.tile([0.0, 0.0, 10.0, 20.0], (PERSONS_PER_IMAGE, 1)),
        scores=np.full(PERSONS_PER_IMAGE, 0.9),
        embeddings=np.tile(embedding, (PERSONS_PER_IMAGE, 1)),
        width=100,
        height=100,
    )


def persons_of(hits, image_id: int) -> int:
    return sum(hit.image_id == image_id for hit in hits)
