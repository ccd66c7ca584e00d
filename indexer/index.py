"""FAISS index types of a gallery: exact (flat), IVF-Flat, IVF-PQ and HNSW, optionally searched
on GPU (flat and IVF).

Every index holds unit vectors under inner product (so similarity = cosine) with FAISS ids equal
to the person ids of the gallery's SQLite tables.

Where FAISS limits a type, and what :class:`VectorIndex` does about it:

- HNSW graphs cannot remove a vector (FAISS's ``remove_ids`` raises). A removed person becomes a
  tombstone: its entry in the index's id map is set to -1, which every search excludes with an
  id selector (the graph still routes through it, so search quality holds). The tombstones
  travel in the snapshot file with the id map. Once they exceed :data:`COMPACT_ABOVE` of the
  graph, :attr:`VectorIndex.needs_compaction` says so, and the gallery rebuilds the graph
  without them at its next snapshot.
- A filter on HNSW (FAISS's id selector in ``SearchParametersHNSW``) is checked on the nodes
  the graph search visits, so a filter admitting a small share of the gallery would leave few
  admitted nodes among them, and fewer hits than exist. The search visits ``1 / share`` times
  as many nodes for a selector admitting that share of the graph's nodes (a filter's, or the
  live ones among tombstones); below :data:`EXACT_FILTER_BELOW` it scans the admitted vectors
  exactly instead (HNSW keeps the full vectors).
- IVF indexes visit ``nprobe`` lists: a very selective filter can leave fewer hits than exist.
- GPU indexes ignore id selectors: filtered searches run on the CPU index. FAISS has no GPU
  HNSW.
"""

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from common.files import write_atomically

INDEX_TYPES = ("flat", "ivf_flat", "ivf_pq", "hnsw")

logger = logging.getLogger(__name__)

# k-means needs a few dozen points per centroid to place it; FAISS warns below 39.
MIN_POINTS_PER_CENTROID = 39
# Default training sample per centroid: centroids are placed well with a few dozen points each,
# and k-means time grows with the sample (FAISS itself subsamples to 256 per centroid).
TRAINING_POINTS_PER_CENTROID = 64

# HNSW defaults, chosen with benchmarks/index.py on identity-clustered 512-d persons (see
# docs/deploy.md, "Choosing an index"): links per node (M), the candidate list while inserting
# (efConstruction) and while searching (efSearch).
HNSW_LINKS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64

# Tombstones (removed persons left in an HNSW graph) beyond this share of the graph make the
# gallery rebuild it at its next snapshot: each costs memory and a little search effort.
COMPACT_ABOVE = 0.1
# A filter admitting less than this share of an HNSW index is searched exactly; above it, the
# graph search visits 1 / share times as many nodes (at most 1 / EXACT_FILTER_BELOW times).
EXACT_FILTER_BELOW = 0.05
# A search spreads over OpenMP threads only with this much work (multiply-adds, about a
# millisecond of one core): a thread team costs tens of microseconds to start on an idle
# machine and milliseconds on a busy one, and its threads spin afterwards, taking the CPU from
# the engine. One query against a small gallery, or against a graph, is far less work.
PARALLEL_MIN_WORK = 1 << 22

_TOMBSTONE = -1
_ALL_IDS = faiss.IDSelectorRange(0, np.iinfo(np.int64).max)  # every id but the tombstone's

_ALLOWED_PARAMS = {
    "flat": {"gpu"},
    "ivf_flat": {"gpu", "nlist", "nprobe", "train_size"},
    "ivf_pq": {"gpu", "nlist", "nprobe", "train_size", "m", "nbits", "rerank"},
    "hnsw": {"gpu", "links", "ef_construction", "ef_search"},
}
_IVF_TYPES = ("ivf_flat", "ivf_pq")


class IndexTrainingError(ValueError):
    """Too few stored embeddings to train the requested index type."""


@dataclass(frozen=True)
class IndexSpec:
    """An index type with all its parameters resolved (the form stored in manifest and SQLite).

    Parameters: ``nlist`` inverted lists, ``nprobe`` lists visited per query, ``train_size``
    vectors sampled for training, ``m`` PQ sub-quantizers of ``nbits`` bits each, ``rerank``:
    IVF-PQ fetches ``rerank * top_k`` candidates whose similarity is then recomputed exactly from
    the stored embeddings; HNSW's ``links`` per node (M in the HNSW paper and in FAISS), its
    candidate lists ``ef_construction`` (inserting) and ``ef_search`` (searching); ``gpu``:
    search on the GPU replicas of the index.
    """

    type: str = "flat"
    params: dict[str, Any] = field(default_factory=lambda: {"gpu": False})

    @property
    def needs_training(self) -> bool:
        return self.type in _IVF_TYPES

    @property
    def min_training_vectors(self) -> int:
        """The fewest vectors this index can be trained on (0 for flat)."""
        return MIN_POINTS_PER_CENTROID * self._centroids_per_quantizer if self.needs_training else 0

    @property
    def _centroids_per_quantizer(self) -> int:
        pq_centroids = 2 ** self.params["nbits"] if self.type == "ivf_pq" else 0
        return max(self.params["nlist"], pq_centroids)

    def factory_string(self) -> str:
        """The FAISS ``index_factory`` description of this index."""
        if self.type == "flat":
            return "IDMap,Flat"
        if self.type == "ivf_flat":
            return f"IVF{self.params['nlist']},Flat"
        if self.type == "hnsw":
            return f"IDMap,HNSW{self.params['links']},Flat"
        # "np": no polysemous training, which only serves Hamming-filtered search (unused here)
        return f"IVF{self.params['nlist']},PQ{self.params['m']}x{self.params['nbits']}np"


def resolve_spec(index_type: str, dim: int, num_vectors: int, **params: Any) -> IndexSpec:
    """Validate ``params`` for ``index_type`` and fill in defaults sized for ``num_vectors``.

    Defaults: ``nlist`` = 4 sqrt(n) (at least 39 vectors per list), ``nprobe`` = nlist / 16,
    ``m`` = dim / 8 (8 dimensions per sub-quantizer), ``nbits`` = 8, ``rerank`` = 4,
    ``train_size`` = 64 per centroid (of the IVF or PQ quantizer, whichever has more);
    HNSW: ``links`` = 32, ``ef_construction`` = 80, ``ef_search`` = 64.
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; choose one of {INDEX_TYPES}")
    unknown = set(params) - _ALLOWED_PARAMS[index_type]
    if unknown:
        raise ValueError(
            f"index type {index_type!r} takes no parameter(s) {sorted(unknown)}; "
            f"it takes {sorted(_ALLOWED_PARAMS[index_type])}"
        )
    gpu = bool(params.pop("gpu", False))
    if gpu and index_type == "hnsw":
        raise ValueError("FAISS has no GPU HNSW index: search HNSW on the CPU (gpu=False)")
    if gpu and not gpu_available():
        raise ValueError("gpu=True, but this FAISS build has no GPU support or sees no GPU")
    resolved: dict[str, Any] = {"gpu": gpu}
    if index_type in _IVF_TYPES:
        resolved.update(_resolve_ivf_params(index_type, dim, num_vectors, params))
    if index_type == "hnsw":
        resolved.update(_resolve_hnsw_params(params))
    return IndexSpec(index_type, resolved)


def _resolve_hnsw_params(params: dict[str, Any]) -> dict[str, Any]:
    links = _positive_int(params, "links", HNSW_LINKS)
    if links < 2:
        raise ValueError(f"links={links}: an HNSW node needs at least 2 links")
    return {
        "links": links,
        "ef_construction": _positive_int(params, "ef_construction", HNSW_EF_CONSTRUCTION),
        "ef_search": _positive_int(params, "ef_search", HNSW_EF_SEARCH),
    }


def _resolve_ivf_params(
    index_type: str, dim: int, num_vectors: int, params: dict[str, Any]
) -> dict[str, Any]:
    default_nlist = max(1, min(round(4 * math.sqrt(num_vectors)), num_vectors // 39))
    nlist = _positive_int(params, "nlist", default_nlist)
    resolved = {"nlist": nlist, "nprobe": _positive_int(params, "nprobe", max(1, nlist // 16))}
    if resolved["nprobe"] > nlist:
        raise ValueError(f"nprobe={resolved['nprobe']} exceeds nlist={nlist}")
    if index_type == "ivf_pq":
        m = _positive_int(params, "m", max(1, dim // 8))
        if dim % m:
            raise ValueError(f"PQ needs m to divide the dimension: m={m}, dim={dim}")
        nbits = _positive_int(params, "nbits", 8)
        if nbits > 16:
            raise ValueError(f"nbits={nbits}: PQ codes have at most 16 bits per sub-quantizer")
        resolved.update(m=m, nbits=nbits, rerank=_positive_int(params, "rerank", 4))
    centroids = max(nlist, 2 ** resolved.get("nbits", 0))
    resolved["train_size"] = _positive_int(
        params, "train_size", max(1, min(num_vectors, TRAINING_POINTS_PER_CENTROID * centroids))
    )
    return resolved


def _positive_int(params: dict[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def gpu_available() -> bool:
    """Whether this FAISS build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class VectorIndex:
    """A FAISS index over person embeddings (ids = person ids), per an :class:`IndexSpec`.

    Not thread-safe by itself: the gallery serialises mutations against searches.
    With ``gpu`` in the spec, unfiltered searches run on a GPU copy of the index, made on first
    use and dropped by every mutation; filtered searches stay on the CPU index, because FAISS's
    GPU indexes ignore id selectors. HNSW removals are tombstones (see the module docstring).
    """

    def __init__(self, index: faiss.Index, spec: IndexSpec) -> None:
        self.index = index
        self.spec = spec
        self._use_gpu = spec.params["gpu"] and gpu_available()
        if spec.params["gpu"] and not self._use_gpu:
            logger.warning("index spec asks for GPU search, but FAISS sees no GPU: using CPU")
        self._gpu_copy: faiss.Index | None = None
        self._graph = _graph_of(index) if spec.type == "hnsw" else None
        self._tombstones = 0 if self._graph is None else int((self._id_map() == _TOMBSTONE).sum())

    @classmethod
    def new(cls, spec: IndexSpec, dim: int, training: np.ndarray | None = None) -> "VectorIndex":
        """An empty index; IVF types are trained on ``training`` (n, dim) unit vectors."""
        index = faiss.index_factory(dim, spec.factory_string(), faiss.METRIC_INNER_PRODUCT)
        if spec.type == "hnsw":
            graph = _graph_of(index).hnsw
            graph.efConstruction = spec.params["ef_construction"]
            graph.efSearch = spec.params["ef_search"]
        if spec.needs_training:
            count = 0 if training is None else len(training)
            if count < spec.min_training_vectors:
                raise IndexTrainingError(
                    f"{spec.type} with {_describe(spec.params)} needs at least "
                    f"{spec.min_training_vectors} embeddings to train ({MIN_POINTS_PER_CENTROID} "
                    f"per centroid), but only {count} are available; use 'flat' (exact) or "
                    "smaller nlist/nbits"
                )
            index.train(np.ascontiguousarray(training, dtype=np.float32))
        return cls(index, spec)

    @classmethod
    def read(cls, path: Path, spec: IndexSpec, dim: int) -> "VectorIndex":
        """Load a snapshot; ValueError when the file is not an index of this spec and dim."""
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise ValueError(f"cannot read FAISS index {path}: {error}") from error
        if not _matches(index, spec, dim):
            raise ValueError(f"FAISS index {path} is not a {spec.type} index of dimension {dim}")
        return cls(index, spec)

    def write(self, path: Path) -> None:
        """Replace ``path`` durably and atomically with this index."""
        write_atomically(path, lambda temporary: faiss.write_index(self.index, str(temporary)))

    @property
    def ntotal(self) -> int:
        """Vectors searched (tombstones are not)."""
        return int(self.index.ntotal) - self._tombstones

    @property
    def needs_compaction(self) -> bool:
        """Whether tombstones exceed :data:`COMPACT_ABOVE` of the index: time to rebuild it."""
        return self._tombstones > COMPACT_ABOVE * max(int(self.index.ntotal), 1)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (n, dim) float32 unit vectors under int64 ``ids``."""
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64)
            )
            self._gpu_copy = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (absent ones are ignored); returns how many vectors went."""
        if not len(ids):
            return 0
        ids = np.asarray(ids, dtype=np.int64)
        if self._graph is not None:
            return self._bury(np.isin(self._id_map(), ids))
        return self._remove(faiss.IDSelectorBatch(ids))

    def remove_above(self, last_id: int) -> int:
        """Remove every id greater than ``last_id``; returns how many vectors went."""
        if self._graph is not None:
            return self._bury(self._id_map() > last_id)
        return self._remove(faiss.IDSelectorRange(last_id + 1, np.iinfo(np.int64).max))

    def _remove(self, selector: faiss.IDSelector) -> int:
        removed = int(self.index.remove_ids(selector))
        if removed:
            self._gpu_copy = None
        return removed

    def _bury(self, positions: np.ndarray) -> int:
        """Turn the HNSW entries at these (boolean) positions into tombstones."""
        id_map = self._id_map()
        buried = int(positions.sum())
        id_map[positions] = _TOMBSTONE
        self._tombstones += buried
        return buried

    def _id_map(self) -> np.ndarray:
        """The IDMap's positions -> ids, as a writable view of FAISS's own array."""
        size = self.index.id_map.size()
        if size == 0:
            return np.empty(0, dtype=np.int64)
        return faiss.rev_swig_ptr(self.index.id_map.data(), size)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        selector: faiss.IDSelector | None = None,
        *,
        selected: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of (q, dim) ``queries``: similarities (q, k) and ids (q, k), id -1 where
        fewer than ``k`` vectors are selected. ``selected``: how many ids ``selector`` admits,
        where known (HNSW searches with it, see the module docstring). ``nprobe`` (IVF) and
        ``ef_search`` (HNSW) override the spec's."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if selector is None and nprobe is None and self._use_gpu:
            return self._gpu_index().search(queries, k)
        if self._tombstones:
            selector = _ALL_IDS if selector is None else faiss.IDSelectorAnd(_ALL_IDS, selector)
        if self._graph is not None:
            return self._search_graph(queries, k, selector, selected, ef_search)
        work = len(queries) * self._scanned_per_query(nprobe) * self.index.d
        with _openmp_threads(work):
            return self.index.search(queries, k, params=self._search_parameters(selector, nprobe))

    def _scanned_per_query(self, nprobe: int | None) -> float:
        """Roughly how many vectors one query compares itself with (flat, IVF)."""
        if not self.spec.needs_training:
            return self.index.ntotal
        nlist = self.spec.params["nlist"]
        probed = self.spec.params["nprobe"] if nprobe is None else nprobe
        return nlist + self.index.ntotal * probed / nlist

    def _search_parameters(
        self, selector: faiss.IDSelector | None, nprobe: int | None
    ) -> faiss.SearchParameters:
        options = {} if selector is None else {"sel": selector}
        if self.spec.needs_training:
            nprobe = self.spec.params["nprobe"] if nprobe is None else nprobe
            return faiss.SearchParametersIVF(nprobe=nprobe, **options)
        return faiss.SearchParameters(**options)

    def _search_graph(
        self,
        queries: np.ndarray,
        k: int,
        selector: faiss.IDSelector | None,
        selected: int | None,
        ef_search: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """HNSW: the graph search, widened by the share of its nodes the selector admits (a
        filter's ``selected``, or the live vectors among tombstones), or an exact scan of the
        admitted vectors when they are less than EXACT_FILTER_BELOW of the nodes."""
        ef = self.spec.params["ef_search"] if ef_search is None else ef_search
        if selector is not None:
            admitted = self.ntotal if selected is None else selected
            share = admitted / max(int(self.index.ntotal), 1)
            if share < EXACT_FILTER_BELOW:
                return self._scan_admitted(queries, k, selector)
            ef = math.ceil(ef / share)
        options = {} if selector is None else {"sel": selector}
        parameters = faiss.SearchParametersHNSW(efSearch=max(ef, k), **options)
        links = self.spec.params["links"]
        with _openmp_threads(len(queries) * max(ef, k) * 2 * links * self.index.d):
            return self.index.search(queries, k, params=parameters)

    def _scan_admitted(
        self, queries: np.ndarray, k: int, selector: faiss.IDSelector
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search of the vectors ``selector`` admits, in the HNSW index's own storage."""
        by_position = faiss.IDSelectorTranslated(self.index.id_map, selector)
        parameters = faiss.SearchParameters(sel=by_position)
        with _openmp_threads(len(queries) * self.index.ntotal * self.index.d):
            similarities, positions = self._graph.storage.search(queries, k, params=parameters)
        ids = np.where(positions >= 0, self._id_map()[np.maximum(positions, 0)], -1)
        return similarities, ids

    def _gpu_index(self) -> faiss.Index:
        if self._gpu_copy is None:
            self._gpu_copy = faiss.index_cpu_to_all_gpus(self.index)
            if self.spec.needs_training:
                faiss.GpuParameterSpace().set_index_parameter(
                    self._gpu_copy, "nprobe", self.spec.params["nprobe"]
                )
        return self._gpu_copy

    def serialized_bytes(self) -> int:
        """Size of the index as written to disk (what it costs in memory, too)."""
        return int(faiss.serialize_index(self.index).nbytes)


@contextmanager
def _openmp_threads(work: float) -> Iterator[None]:
    """Search on one OpenMP thread when ``work`` (multiply-adds) is below PARALLEL_MIN_WORK,
    on this thread's usual number otherwise. The setting is the calling thread's own."""
    usual = faiss.omp_get_max_threads()
    if work >= PARALLEL_MIN_WORK or usual == 1:
        yield
        return
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(usual)


def _graph_of(index: faiss.Index) -> faiss.IndexHNSWFlat:
    """The HNSW index inside an IDMap."""
    return faiss.downcast_index(index.index)


def _matches(index: faiss.Index, spec: IndexSpec, dim: int) -> bool:
    if index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return False
    if spec.type == "flat":
        return isinstance(index, faiss.IndexIDMap) and isinstance(
            faiss.downcast_index(index.index), faiss.IndexFlat
        )
    if spec.type == "hnsw":
        return (
            isinstance(index, faiss.IndexIDMap)
            and isinstance(_graph_of(index), faiss.IndexHNSWFlat)
            and _graph_of(index).hnsw.nb_neighbors(1) == spec.params["links"]
        )
    ivf_class = faiss.IndexIVFFlat if spec.type == "ivf_flat" else faiss.IndexIVFPQ
    if not isinstance(index, ivf_class) or index.nlist != spec.params["nlist"]:
        return False
    return spec.type == "ivf_flat" or (
        spec.params["m"] == index.pq.M and index.pq.nbits == spec.params["nbits"]
    )


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value}" for name, value in sorted(params.items()) if name != "gpu")
