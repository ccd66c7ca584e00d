"""Index types: rebuilding a gallery into IVF-Flat, IVF-PQ or HNSW keeps its search results
consistent; HNSW's removals (tombstones), compaction and filtered searches."""

import threading

import faiss
import numpy as np
import pytest

from indexer.index import (
    COMPACT_ABOVE,
    EXACT_FILTER_BELOW,
    PARALLEL_MIN_WORK,
    VectorIndex,
    gpu_available,
    resolve_spec,
)
from indexer.store import INDEX_FILE, Gallery
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
        ("annoy", {}, "unknown index type 'annoy'"),
        ("flat", {"nlist": 4}, "takes no parameter"),
        ("hnsw", {"nprobe": 4}, "takes no parameter"),
        ("hnsw", {"links": 1}, "at least 2 links"),
        ("hnsw", {"ef_search": 0}, "ef_search must be a positive integer"),
        ("hnsw", {"gpu": True}, "FAISS has no GPU HNSW index"),
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


# -- HNSW ------------------------------------------------------------------------------------


def test_hnsw_defaults():
    assert resolve_spec("hnsw", DIM, 1_000_000).params == {
        "gpu": False, "links": 32, "ef_construction": 80, "ef_search": 64,
    }  # fmt: skip


def test_hnsw_searching_the_whole_graph_returns_exactly_the_flat_results(gallery, crowd):
    queries = crowd[:20]
    exact = top_person_ids(gallery, queries, 10)
    gallery.rebuild("hnsw", links=8, ef_construction=40, ef_search=1000)
    assert gallery.stats().index_type == "hnsw"
    assert top_person_ids(gallery, queries, 10) == exact


def test_hnsw_finds_each_stored_person_first_with_its_default_effort(gallery, crowd):
    gallery.rebuild("hnsw")
    assert [ids[0] for ids in top_person_ids(gallery, crowd[:50], 1)] == list(range(1, 51))


def test_removed_persons_are_tombstones_until_a_snapshot_compacts_them(
    gallery, gallery_path, crowd
):
    """FAISS cannot remove from an HNSW graph: removed persons stay in it, never returned,
    also after reopening (the tombstones travel in the snapshot). Once they exceed COMPACT_ABOVE
    of the graph, the next snapshot rebuilds it without them."""
    gallery.rebuild("hnsw")
    few = int(COMPACT_ABOVE * 250) // 2  # images of 4 persons: 5% of the persons
    for image_id in range(1, few + 1):
        gallery.remove_image(image_id)
    removed = set(range(1, 4 * few + 1))
    hits = {hit.person_id for query in crowd[:40] for hit in gallery.search(query, 10)}
    assert hits and not hits & removed
    gallery.snapshot()
    assert faiss.read_index(str(gallery_path / INDEX_FILE)).ntotal == 1000  # kept: too few
    gallery.close()
    with Gallery.open(gallery_path, FINGERPRINT) as reopened:
        assert reopened.stats().indexed == 1000 - 4 * few
        hits = {hit.person_id for query in crowd[:40] for hit in reopened.search(query, 10)}
        assert hits and not hits & removed
        for image_id in range(few + 1, 3 * few + 1):  # 15% removed in all
            reopened.remove_image(image_id)
        reopened.snapshot()
        assert faiss.read_index(str(gallery_path / INDEX_FILE)).ntotal == 1000 - 12 * few
        assert reopened.stats().indexed == 1000 - 12 * few
        first = [ids[0] for ids in top_person_ids(reopened, crowd[12 * few : 12 * few + 20], 1)]
        assert first == list(range(12 * few + 1, 12 * few + 21))


def test_hnsw_searches_the_few_persons_left_among_many_tombstones_exactly(gallery, crowd):
    """Before a snapshot compacts them, tombstones are nodes no search may return: with 96% of
    the graph removed, the 40 persons left are scanned exactly."""
    gallery.rebuild("hnsw", links=4, ef_construction=8, ef_search=8)
    for image_id in range(11, 251):
        gallery.remove_image(image_id)
    left = set(range(1, 41))
    queries = crowd[100:120]  # removed persons' vectors
    assert top_person_ids(gallery, queries, 10) == exact_top(crowd, queries, left, 10)


@pytest.fixture
def cameras(gallery, random_embeddings):
    """1000 random persons in 250 images, the images' cameras c0..c39 in turn (each camera 2.5%
    of the gallery); returns the embeddings (1000, DIM) in id order."""
    embeddings = random_embeddings(1000, seed=4)
    gallery.add_images(
        [
            NewImage(
                data=f"scene {number}".encode(),
                boxes=np.tile([0.0, 0.0, 10.0, 20.0], (PERSONS_PER_IMAGE, 1)),
                scores=np.full(PERSONS_PER_IMAGE, 0.9),
                embeddings=embeddings[
                    PERSONS_PER_IMAGE * number : PERSONS_PER_IMAGE * (number + 1)
                ],
                width=100,
                height=100,
                camera=f"c{number % 40}",
            )
            for number in range(250)
        ]
    )
    return embeddings


def exact_top(embeddings, queries, admitted, k):
    """Person ids (from 1) of the k admitted embeddings most similar to each query."""
    admitted = np.asarray(sorted(admitted))
    similarities = queries @ embeddings[admitted - 1].T
    return [admitted[np.argsort(-row, kind="stable")[:k]].tolist() for row in similarities]


def test_hnsw_scans_a_filter_admitting_few_persons_exactly(gallery, cameras):
    """One camera of 40 admits 2.5% of the gallery (below EXACT_FILTER_BELOW): a graph search
    would meet few of its persons, so they are scanned exactly, tombstones left out."""
    assert EXACT_FILTER_BELOW > 1 / 40
    gallery.rebuild("hnsw", links=4, ef_construction=8, ef_search=8)  # a poor graph
    gallery.remove_image(4)  # c3's first image (persons 13-16): tombstones
    c3 = {4 * number + offset + 1 for number in range(3, 250, 40) for offset in range(4)}
    queries = cameras[:20]
    found = [[hit.person_id for hit in gallery.search(q, 10, cameras=["c3"])] for q in queries]
    assert found == exact_top(cameras, queries, c3 - {13, 14, 15, 16}, 10)


def test_hnsw_widens_its_search_for_a_filter_by_the_share_it_admits(random_embeddings):
    """A filter admitting half the persons makes the graph search visit twice as many nodes:
    more of the exact hits are found than with the same effort unwidened."""
    embeddings = random_embeddings(1000, seed=8)
    admitted = set(range(1, 1001, 2))
    usual = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one thread builds the same graph every time
    try:
        index = VectorIndex.new(resolve_spec("hnsw", DIM, 0, links=4, ef_construction=8), DIM)
        index.add(np.arange(1, 1001), embeddings)
    finally:
        faiss.omp_set_num_threads(usual)
    queries = embeddings[:100]
    exact = exact_top(embeddings, queries, admitted, 10)
    selector = faiss.IDSelectorBatch(np.array(sorted(admitted), dtype=np.int64))

    def recall(selected):
        _, ids = index.search(queries, 10, selector, selected=selected, ef_search=10)
        assert set(ids.ravel().tolist()) <= admitted
        return np.mean([len(set(e) & set(f)) for e, f in zip(exact, ids.tolist(), strict=True)])

    assert recall(selected=500) > recall(selected=None)


def test_an_hnsw_snapshot_of_other_links_is_refused(tmp_path, random_embeddings):
    spec = resolve_spec("hnsw", DIM, 0, links=8)
    index = VectorIndex.new(spec, DIM)
    index.add(np.arange(1, 101), random_embeddings(100, seed=5))
    index.write(tmp_path / "vectors.faiss")
    assert VectorIndex.read(tmp_path / "vectors.faiss", spec, DIM).ntotal == 100
    with pytest.raises(ValueError, match="not a hnsw index"):
        VectorIndex.read(tmp_path / "vectors.faiss", resolve_spec("hnsw", DIM, 0, links=16), DIM)


def test_a_search_leaves_the_calling_threads_openmp_setting_as_it_was(random_embeddings):
    """Small searches run on one OpenMP thread (a thread team would cost more than the work);
    the setting is restored for whatever the thread runs next."""
    index = VectorIndex.new(resolve_spec("flat", DIM, 0), DIM)
    index.add(np.arange(1, 101), random_embeddings(100, seed=6))
    assert 100 * DIM < PARALLEL_MIN_WORK
    seen = []

    def search() -> None:
        faiss.omp_set_num_threads(2)
        index.search(random_embeddings(1, seed=7), 5)
        seen.append(faiss.omp_get_max_threads())

    thread = threading.Thread(target=search)
    thread.start()
    thread.join()
    assert seen == [2]
