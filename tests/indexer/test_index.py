"""Index types: rebuilding a gallery into IVF-Flat / IVF-PQ keeps its search results consistent."""

import numpy as np
import pytest

from indexer.index import gpu_available, resolve_spec
from indexer.store import Gallery
from indexer.types import NewImage

FINGERPRINT = "model-a"
DIM = 8
PERSONS_PER_IMAGE = 4


@pytest.fixture
def crowd(gallery, random_embeddings):
    """1000 random persons in 250 images; returns their embeddings (1000, DIM) in id order."""
    embeddings = random_embeddings(1000, seed=1)
    images = [
        NewImage(
            data=f"crowd {number}".encode(),
            boxes=np.tile([0.0, 0.0, 10.0, 20.0], (PERSONS_PER_IMAGE, 1)),
            scores=np.full(PERSONS_PER_IMAGE, 0.9),
            embeddings=embeddings[PERSONS_PER_IMAGE * number : PERSONS_PER_IMAGE * (number + 1)],
            width=100,
            height=100,
        )
        for number in range(250)
    ]
    gallery.add_images(images)
    return embeddings


def top_person_ids(gallery, queries, top_k):
    return [[hit.person_id for hit in gallery.search(query, top_k)] for query in queries]


def test_ivf_flat_visiting_every_list_returns_exactly_the_flat_results(gallery, crowd):
    queries = crowd[:20]
    exact = top_person_ids(gallery, queries, 10)
    gallery.rebuild("ivf_flat", nlist=8, nprobe=8)
    assert gallery.stats().index_type == "ivf_flat"
    assert top_person_ids(gallery, queries, 10) == exact


def test_ivf_flat_probing_few_lists_still_finds_each_stored_person_first(gallery, crowd):
    """A stored vector sits in the list of its nearest centroid, which is probed first."""
    gallery.rebuild("ivf_flat", nlist=8, nprobe=1)
    person_ids = np.arange(1, 51)  # ids follow insertion order, from 1
    assert [ids[0] for ids in top_person_ids(gallery, crowd[:50], 1)] == person_ids.tolist()


def test_ivf_pq_reports_exact_similarities_and_finds_each_stored_person_first(gallery, crowd):
    gallery.rebuild("ivf_pq", nlist=8, nprobe=8, m=4, nbits=4, rerank=8)
    for person_id, query in enumerate(crowd[:20], start=1):
        hits = gallery.search(query, 5)
        assert hits[0].person_id == person_id and hits[0].similarity == pytest.approx(1.0)
        # PQ codes only approximate; the reported similarity is recomputed from SQLite
        exact = [float(crowd[hit.person_id - 1] @ query) for hit in hits]
        assert [hit.similarity for hit in hits] == pytest.approx(exact, abs=1e-6)


def test_the_index_type_survives_reopening_and_new_persons_join_it(
    gallery, gallery_path, crowd, image
):
    gallery.rebuild("ivf_flat", nlist=8, nprobe=8)
    gallery.close()
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert reopened.stats().index_type == "ivf_flat"
        assert reopened.stats().index_params["nlist"] == 8
        newcomer = -crowd[0]  # a new vector: similarity 1 to itself only
        added = reopened.add_images([image(newcomer)])[0]
        assert reopened.search(newcomer, 1)[0].image_id == added.image_id
        reopened.rebuild("flat")
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert reopened.stats().index_type == "flat"
        assert reopened.stats().indexed == 1001


def test_filters_apply_to_ivf_indexes_too(gallery, crowd):
    gallery.rebuild("ivf_flat", nlist=8, nprobe=8)
    hits = gallery.search(crowd[0], 10, exclude_images=[1])  # image 1 holds persons 1-4
    assert hits and all(hit.image_id != 1 for hit in hits)


def test_rebuild_refuses_to_train_on_too_few_embeddings(gallery, random_embeddings, image):
    gallery.add_images([image(*random_embeddings(100, seed=2))])
    with pytest.raises(ValueError, match=r"needs at least 312 embeddings to train .* only 100"):
        gallery.rebuild("ivf_flat", nlist=8)  # 39 per centroid x 8 centroids = 312
    assert gallery.stats().index_type == "flat"  # unchanged


@pytest.mark.parametrize(
    ("index_type", "params", "message"),
    [
        ("hnsw", {}, "unknown index type 'hnsw'"),
        ("flat", {"nlist": 4}, "takes no parameter"),
        ("ivf_flat", {"nlist": 0}, "nlist must be a positive integer"),
        ("ivf_flat", {"nlist": 4, "nprobe": 5}, "nprobe=5 exceeds nlist=4"),
        ("ivf_pq", {"m": 3}, "m to divide the dimension"),
    ],
)
def test_bad_index_parameters_are_refused(index_type, params, message):
    with pytest.raises(ValueError, match=message):
        resolve_spec(index_type, DIM, 10_000, **params)


def test_defaults_are_sized_by_the_number_of_vectors():
    # nlist = 4 sqrt(100000) = 1264.9 -> 1265 (below the cap of 100000 / 39 = 2564 lists),
    # nprobe = 1265 // 16 = 79, m = 8 / 8 = 1, train_size = 64 per centroid = 64 x 1265
    spec = resolve_spec("ivf_pq", DIM, 100_000)
    assert spec.params == {
        "gpu": False, "nlist": 1265, "nprobe": 79, "m": 1, "nbits": 8, "rerank": 4,
        "train_size": 80_960,
    }  # fmt: skip


def test_the_default_nlist_keeps_39_vectors_per_list():
    # 4 sqrt(10000) = 400 lists would hold 25 vectors each: capped to 10000 // 39 = 256
    assert resolve_spec("ivf_flat", DIM, 10_000).params["nlist"] == 256


@pytest.mark.skipif(gpu_available(), reason="this FAISS build has a GPU")
def test_gpu_search_without_gpu_support_is_refused_clearly(gallery):
    with pytest.raises(ValueError, match="no GPU support"):
        gallery.rebuild("flat", gpu=True)


@pytest.mark.skipif(not gpu_available(), reason="needs FAISS with GPU support and a GPU")
def test_gpu_search_matches_cpu_search(gallery, crowd):
    queries = crowd[:20]
    exact = top_person_ids(gallery, queries, 10)
    gallery.rebuild("flat", gpu=True)
    assert top_person_ids(gallery, queries, 10) == exact
