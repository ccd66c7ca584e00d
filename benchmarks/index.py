"""Gallery search: exact (flat) next to IVF-Flat, IVF-PQ and HNSW, measured side by side in one
run.

    python benchmarks/index.py [--num 1000000] [--dim 512] [--queries 1000] [--batch 32]
                               [--threads 2] [--nlist N] [--train-size N] [--target 0.95]
                               [--types flat ivf_flat ivf_pq hnsw] [--links M]
                               [--ef-construction N] [--speedup 50]

Builds each index type over the same synthetic re-id gallery, through the indexer's own index
code (``indexer.index``), and prints per index type: build time, bytes per person, and for a
sweep of its search effort (IVF: ``nprobe``; HNSW: ``ef_search``) the queries/s and recall@10
against exact search. It picks the smallest effort whose recall@10 reaches ``--target`` and
prints its speed-up over exact search, and whether that meets ``--speedup``.
IVF-PQ re-ranks ``rerank x 10`` candidates by exact similarity (the gallery recomputes them from
the embeddings in SQLite; here from the vectors in memory), so its recall is that of the
gallery's answers. HNSW is built with the gallery's defaults (``--links``, ``--ef-construction``
to try others). Queries go ``--batch`` at a time (what a micro-batching server sends).
A script, not a test: the numbers depend on the machine. ``--num 200000`` for a quick run.

``--ingest`` measures the ingest pipeline's throughput instead (see ``INGEST_USAGE`` below).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.index import INDEX_TYPES, IndexSpec, VectorIndex, resolve_spec

TOP_K = 10
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EF_SEARCHES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
LATENT_DIM = 64  # identities vary along few directions (clothing colours, build, ...)
VIEWS = (2, 40)  # each identity is seen between a few and a few dozen times
CHUNK = 100_000

# Why not uniform random vectors: in 512 dimensions independent unit vectors are all nearly
# orthogonal (similarity 0 +- 0.044), so the "10 nearest neighbours" of a query are a random
# draw from a thin shell, hardly nearer than the rest of the gallery. No index can exploit
# structure that is not there (IVF must scan most lists for any recall), and what it retrieves
# means nothing. A re-id gallery is the opposite: the views of one person cluster tightly
# (same-person similarity ~0.7), identities spread over a low-dimensional space, and the
# neighbours a search must find are that person's other views. The generator below has that
# structure: identity centres in a 64-dimensional subspace, each seen 2-40 times (log-uniform)
# with view noise (pose, camera, light) half inside the subspace and half isotropic.


def reid_like_gallery(
    num: int, dim: int, num_queries: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(num, dim) gallery and (num_queries, dim) queries: unit vectors in identity clusters.

    A query is a new view of an identity of the gallery (not one of the stored views).
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, LATENT_DIM)))[0].astype(np.float32)
    views = np.exp(rng.uniform(np.log(VIEWS[0]), np.log(VIEWS[1] + 1), size=num)).astype(int)
    identity_of_view = np.repeat(np.arange(num), views)[:num]  # enough identities for num views
    num_identities = identity_of_view[-1] + 1
    centres = _unit(rng.standard_normal((num_identities, LATENT_DIM), dtype=np.float32) @ basis.T)
    gallery = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, CHUNK):
        identities = identity_of_view[start : start + CHUNK]
        gallery[start : start + len(identities)] = _view(centres[identities], basis, rng)
    queried = rng.choice(identity_of_view, size=num_queries)  # identities in proportion to views
    return gallery, _view(centres[queried], basis, rng)


def _view(centres: np.ndarray, basis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New views of these identity centres: noise of norm ~0.5 in the subspace, ~0.5 outside."""
    count, dim = centres.shape
    latent = rng.standard_normal((count, LATENT_DIM), dtype=np.float32) @ basis.T
    isotropic = rng.standard_normal((count, dim), dtype=np.float32)
    return _unit(centres + 0.5 * latent / np.sqrt(LATENT_DIM) + 0.5 * isotropic / np.sqrt(dim))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build(spec: IndexSpec, gallery: np.ndarray, seed: int) -> tuple[VectorIndex, float]:
    """The index of ``spec`` over ``gallery`` (ids 0..n-1) and the seconds it took."""
    start = time.perf_counter()
    training = None
    if spec.needs_training:
        sample = np.random.default_rng(seed).choice(len(gallery), spec.params["train_size"], False)
        training = gallery[np.sort(sample)]
    index = VectorIndex.new(spec, gallery.shape[1], training)
    for first in range(0, len(gallery), CHUNK):
        chunk = gallery[first : first + CHUNK]
        index.add(np.arange(first, first + len(chunk)), chunk)
    return index, time.perf_counter() - start


def search_all(
    index: VectorIndex, queries: np.ndarray, batch: int, gallery: np.ndarray, **effort: int
) -> tuple[np.ndarray, float]:
    """Top-10 ids (q, 10) of every query, ``batch`` at a time, and the queries per second.
    ``effort``: ``nprobe`` (IVF) or ``ef_search`` (HNSW), overriding the spec's."""
    rerank = index.spec.params.get("rerank", 1)
    results = []
    start = time.perf_counter()
    for first in range(0, len(queries), batch):
        chunk = queries[first : first + batch]
        _, ids = index.search(chunk, TOP_K * rerank, **effort)
        results.append(_rerank(ids, chunk, gallery) if rerank > 1 else ids)
    elapsed = time.perf_counter() - start
    return np.concatenate(results), len(queries) / elapsed


def _rerank(candidates: np.ndarray, queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """The 10 candidates of each query most similar by exact inner product (q, 10)."""
    safe = np.maximum(candidates, 0)  # -1 = no candidate; scored -inf below
    scores = np.einsum("qkd,qd->qk", gallery[safe], queries)
    scores[candidates < 0] = -np.inf
    best = np.argsort(-scores, axis=1)[:, :TOP_K]
    return np.take_along_axis(candidates, best, axis=1)


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top 10 that was found."""
    hits = [len(np.intersect1d(f, e)) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / TOP_K


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=1_000_000, help="persons in the gallery")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32, help="queries per search call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nlist", type=int, help="IVF lists (default: the gallery's default)")
    parser.add_argument("--train-size", type=int, help="training sample (default: the gallery's)")
    parser.add_argument("--links", type=int, help="HNSW links per node (default: the gallery's)")
    parser.add_argument("--ef-construction", type=int, help="HNSW (default: the gallery's)")
    parser.add_argument("--types", nargs="+", choices=INDEX_TYPES[1:], default=INDEX_TYPES[1:],
                        help="approximate index types to compare with exact search")  # fmt: skip
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 to reach")
    parser.add_argument("--speedup", type=float, default=50, help="x exact queries/s to reach")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dim < LATENT_DIM or args.dim % 8:
        parser.error(f"--dim must be a multiple of 8 and at least {LATENT_DIM} (the identities')")
    faiss.omp_set_num_threads(args.threads)

    start = time.perf_counter()
    gallery, queries = reid_like_gallery(args.num, args.dim, args.queries, args.seed)
    seconds = time.perf_counter() - start
    print(f"gallery: {args.num} persons x {args.dim} dims, {args.queries} queries, "
          f"batch {args.batch}, {args.threads} threads (made in {seconds:.1f} s)")  # fmt: skip
    _print_similarity_profile(gallery, queries)

    flat, seconds = build(resolve_spec("flat", args.dim, args.num), gallery, args.seed)
    exact, exact_qps = search_all(flat, queries, args.batch, gallery)
    print(f"\n{'index':<9} {'effort':>14} {'queries/s':>10} {'x exact':>8} {'recall@10':>9}")
    print(f"{'flat':<9} {'-':>14} {exact_qps:>10.1f} {1:>8.1f} {1:>9.3f}")
    memory = {"flat": (flat.serialized_bytes() / args.num, seconds)}
    del flat

    chosen = {}
    for index_type in args.types:
        spec = resolve_spec(index_type, args.dim, args.num, **_build_params(index_type, args))
        index, seconds = build(spec, gallery, args.seed)
        memory[index_type] = (index.serialized_bytes() / args.num, seconds)
        name, efforts = _effort_sweep(spec)
        for effort in efforts:
            found, qps = search_all(index, queries, args.batch, gallery, **{name: effort})
            recall = recall_at_10(found, exact)
            shown = f"{name}={effort}"
            print(
                f"{index_type:<9} {shown:>14} {qps:>10.1f} {qps / exact_qps:>8.1f} {recall:>9.3f}"
            )
            if recall >= args.target:
                chosen[index_type] = ({**spec.params, name: effort}, qps / exact_qps, recall)
                break
        del index

    print(f"\n{'index':<9} {'bytes/person':>12} {'build s':>8}")
    for index_type, (bytes_per_person, seconds) in memory.items():
        print(f"{index_type:<9} {bytes_per_person:>12.1f} {seconds:>8.1f}")
    print(f"\nchosen (smallest effort with recall@10 >= {args.target}; target >= "
          f"{args.speedup:g}x exact queries/s):")  # fmt: skip
    for index_type in args.types:
        if index_type not in chosen:
            print(f"  {index_type}: no effort in the sweep reached the target recall")
            continue
        params, speedup, recall = chosen[index_type]
        shown = {k: v for k, v in params.items() if k != "gpu"}
        verdict = "meets" if speedup >= args.speedup else "misses"
        print(f"  {index_type}: {shown}: {speedup:.1f}x exact queries/s at recall@10 "
              f"{recall:.3f} ({verdict} the target)")  # fmt: skip


def _build_params(index_type: str, args: argparse.Namespace) -> dict[str, int]:
    """The command line's build parameters that apply to ``index_type``."""
    given = {
        "ivf_flat": {"nlist": args.nlist, "train_size": args.train_size},
        "ivf_pq": {"nlist": args.nlist, "train_size": args.train_size, "m": args.dim // 8},
        "hnsw": {"links": args.links, "ef_construction": args.ef_construction},
    }[index_type]
    return {name: value for name, value in given.items() if value is not None}


def _effort_sweep(spec: IndexSpec) -> tuple[str, list[int]]:
    """The search-effort parameter of an index type and the values to sweep, cheapest first."""
    if spec.type == "hnsw":
        return "ef_search", list(EF_SEARCHES)
    return "nprobe", [n for n in NPROBES if n <= spec.params["nlist"]]


def _print_similarity_profile(gallery: np.ndarray, queries: np.ndarray) -> None:
    """How re-id-like the data is: similarity of each query to its best gallery match and to
    a random gallery person."""
    sample = queries[:20]
    best = (sample @ gallery.T).max(axis=1)
    random_pairs = np.einsum("qd,qd->q", sample, gallery[: len(sample)])
    print(f"similarity of a query to its best match: median {np.median(best):.2f}; "
          f"to a random person: median {np.median(random_pairs):.2f}")  # fmt: skip


# -- ingest throughput -------------------------------------------------------------------

INGEST_USAGE = """Ingest pipeline throughput against the bare engine, on the same images:

    python benchmarks/index.py --ingest [--model MODEL_DIR] [--frames 200] [--width 384]
                               [--height 256] [--batch-size 8] [--workers 2] [--backend auto]
                               [--device cpu] [--repeat 2]

Writes synthetic PRW frames (``python -m training.synthetic --format prw``) and, without
``--model``, exports the tiny AlignPS (configs/tiny/alignps_synthetic.yaml, random weights,
every one of its 50 detection slots kept, so that writes are heavier than a real gallery's) to
ONNX. Then times, alternately, ``--repeat`` times each: the bare engine (``engine.detect`` on
images decoded beforehand, ``--batch-size`` at a time) and the pipeline (``indexer.ingest``
from the files into a new gallery: reading, decoding, batching, the engine, writes), without and
with a job. Prints images/s and the pipeline's cost over the engine's (best of the repeats);
the target is at most 15%.
"""

INGEST_TARGET = 0.15
REPOSITORY = Path(__file__).resolve().parents[1]


def ingest_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/index.py", description=INGEST_USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--ingest", action="store_true", required=True)
    parser.add_argument("--model", type=Path, help="exported model folder (default: tiny)")
    parser.add_argument("--frames", type=int, default=200, help="synthetic PRW frames")
    parser.add_argument("--width", type=int, default=384, help="frame width (generator's)")
    parser.add_argument("--height", type=int, default=256, help="frame height (generator's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)

    from export.runtime import load_engine
    from indexer.images import decode_image
    from indexer.ingest import ingest
    from indexer.sources import ImageSource
    from indexer.store import open_gallery_for

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        frames = synthetic_prw_frames(scratch / "prw", args.frames, args.width, args.height)
        model_dir = args.model or tiny_onnx_model(scratch / "model")
        engine = load_engine(model_dir, args.backend, args.device, batch_size=args.batch_size)
        print(f"{len(frames)} frames of {frames_size(frames)}, model {engine.info.name} on "
              f"{engine.info.backend}/{engine.info.device}, batch {args.batch_size}, "
              f"{args.workers} decoding threads")  # fmt: skip
        decoded = [decode_image(path.read_bytes()) for path in frames]
        sources = [ImageSource(str(path)) for path in frames]
        engine.detect(decoded[: args.batch_size])  # warm-up: first-call allocations

        def bare_engine() -> float:
            start = time.perf_counter()
            for first in range(0, len(decoded), args.batch_size):
                engine.detect(decoded[first : first + args.batch_size])
            return time.perf_counter() - start

        def pipeline(run: int, job: str | None) -> float:
            folder = scratch / f"gallery-{run}-{job}"
            with open_gallery_for(folder, engine.info.fingerprint, engine.info.dim) as gallery:
                summary = ingest(
                    gallery,
                    engine,
                    sources,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    job=job,
                    progress=False,
                    min_score=0.0,
                )
            if summary.added != len(frames):
                raise RuntimeError(f"the pipeline added {summary.added} of {len(frames)} frames")
            return summary.seconds

        seconds: dict[str, list[float]] = {"engine": [], "pipeline": [], "pipeline+job": []}
        for run in range(args.repeat):
            seconds["engine"].append(bare_engine())
            seconds["pipeline"].append(pipeline(run, None))
            seconds["pipeline+job"].append(pipeline(run, "bench"))

    engine_best = min(seconds["engine"])
    print(f"\n{'':<13} {'images/s':>9} {'s (best)':>9} {'vs engine':>10}")
    for name, times in seconds.items():
        best = min(times)
        cost = best / engine_best - 1
        print(f"{name:<13} {len(frames) / best:>9.1f} {best:>9.2f} {cost:>+10.1%}")
    worst = max(min(seconds["pipeline"]), min(seconds["pipeline+job"])) / engine_best - 1
    verdict = "meets" if worst <= INGEST_TARGET else "MISSES"
    print(f"pipeline cost over the bare engine: {worst:+.1%} ({verdict} the target "
          f"<= {INGEST_TARGET:.0%})")  # fmt: skip


def synthetic_prw_frames(root: Path, count: int, width: int, height: int) -> list[Path]:
    """``count`` synthetic PRW frames of ``width`` x ``height`` (a fifth in the training
    split), written by the generator's command line; identities scaled down so that small
    counts are valid. Persons keep the generator's heights, scaled with the frame height."""
    scale = height / 256  # the generator's default frame height
    train = max(count // 5, 1)
    command = [sys.executable, "-m", "training.synthetic", "--format", "prw", "--out", str(root),
               "--train-images", str(train), "--test-images", str(count - train),
               "--train-identities", str(max(train // 4, 1)),
               "--test-identities", str(max((count - train) // 5, 1)), "--no-progress",
               "--width", str(width), "--height", str(height),
               "--min-person", str(40 * scale), "--max-person", str(120 * scale)]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPOSITORY)
    return sorted((root / "frames").glob("*.jpg"))


def frames_size(frames: list[Path]) -> str:
    from PIL import Image

    with Image.open(frames[0]) as image:
        return f"{image.width}x{image.height}"


def tiny_onnx_model(out: Path) -> Path:
    """The tiny AlignPS with random weights, exported to ONNX with ``export_checkpoint``."""
    import safetensors.torch
    import torch
    import yaml

    from common.config_files import read_yaml_mapping
    from common.run_folder import RUN_CONFIG_FILE, RUN_WEIGHTS_FILE
    from export.artifact import build_model
    from export.cli import export_checkpoint

    config = read_yaml_mapping(REPOSITORY / "configs/tiny/alignps_synthetic.yaml")
    config["model"]["inference"]["score_thresh"] = 0.0  # keep all 50 slots: heavy writes
    run = out.parent / "run"
    run.mkdir(parents=True)
    torch.manual_seed(0)
    safetensors.torch.save_model(build_model(config["model"]), str(run / RUN_WEIGHTS_FILE))
    (run / RUN_CONFIG_FILE).write_text(yaml.safe_dump({"model": config["model"]}))
    start = time.perf_counter()
    export_checkpoint(run, out, parity=False, log=lambda _: None)
    print(f"exported the tiny model to ONNX in {time.perf_counter() - start:.0f} s")
    return out


if __name__ == "__main__":
    if "--ingest" in sys.argv[1:]:
        ingest_main(sys.argv[1:])
    else:
        main()
