"""Speed of the runtime backends, measured side by side in one run, as ratios to PyTorch eager.

    python benchmarks/runtime.py [--models alignps leaps seqnet psarm] [--sizes 1500x900 750x450]
                                 [--repeat 3] [--warmup 1] [--batch 2] [--threads N]
                                 [--device cpu] [--profile]

For each model (the paper configuration, ResNet-50, random initial weights: speed does not
depend on the values), the script exports a model folder (ONNX graphs and weights) into a
temporary folder, loads every backend available here, and times ``Engine.forward`` (the backend
alone, on a preprocessed batch of the given input size, width x height):

- latency: one image, median of ``--repeat`` runs after ``--warmup``;
- throughput: a batch of ``--batch`` images, images per second from the median batch time.

Backends take turns within every repeat, so that a machine busy with other work slows them
alike. Both libraries get the same number of CPU threads. ``--profile`` runs ONNX Runtime's
profiler once per model and size and prints the operators that take the most time (where the
time goes when ONNX Runtime is not faster). A script, not a test: the numbers depend on the
machine.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config_files import read_yaml_mapping
from export.artifact import GraphFiles, build_manifest, write_model_manifest, write_weights
from export.artifact import build_model as build_model_without_weights
from export.onnx import write_onnx_graphs
from export.runtime import BackendUnavailableError, Engine, load_engine, whole_batch_sizes

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = {
    "alignps": ROOT / "configs/alignps_r50_prw.yaml",
    "leaps": ROOT / "configs/leaps_r50_prw.yaml",
    "seqnet": ROOT / "configs/seqnet_r50_prw.yaml",
    "psarm": ROOT / "configs/psarm_r50_prw.yaml",
}
BACKENDS = ("torch", "onnxruntime", "tensorrt")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=sorted(PAPER_CONFIGS), default=["alignps", "leaps"]
    )
    parser.add_argument("--sizes", nargs="+", default=["1500x900", "750x450"], help="WIDTHxHEIGHT")
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per number")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    parser.add_argument("--batch", type=int, default=2, help="images per throughput batch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--profile", action="store_true", help="ONNX Runtime's top operators")
    return parser.parse_args()


def parse_size(text: str) -> tuple[int, int]:
    """``1500x900`` -> (height 900, width 1500)."""
    width, _, height = text.lower().partition("x")
    return int(height), int(width)


def export_paper_model(name: str, folder: Path) -> Path:
    """A model folder of the paper configuration with random weights (no parity check)."""
    torch.manual_seed(0)
    config = read_yaml_mapping(PAPER_CONFIGS[name])["model"]
    model = build_model_without_weights(config).eval()
    out = folder / name
    out.mkdir(parents=True)
    manifest = build_manifest(model)
    write_weights(model, out, manifest)
    started = time.perf_counter()
    manifest.onnx = GraphFiles(**write_onnx_graphs(model, out))
    print(f"{name}: exported in {time.perf_counter() - started:.0f} s")
    write_model_manifest(manifest, out)
    return out


def load_engines(model_dir: Path, device: str, threads: int) -> dict[str, Engine]:
    engines = {}
    for backend in BACKENDS:
        try:
            engines[backend] = load_engine(model_dir, backend, device, threads=threads)
        except BackendUnavailableError as error:
            print(f"  {backend}: skipped ({str(error).split(';')[0]})")
    return engines


def batch_of(count: int, size: tuple[int, int]) -> np.ndarray:
    """A preprocessed batch (count, 3, H, W): smooth random images, normalised."""
    generator = torch.Generator().manual_seed(count)
    coarse = torch.randn(count, 3, 8, 12, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear").numpy()


def forwards(engines: dict[str, Engine], batch: np.ndarray) -> dict[str, Callable[[], object]]:
    return {
        backend: functools.partial(engine.forward, batch) for backend, engine in engines.items()
    }


def time_in_turns(
    runs: dict[str, Callable[[], object]], repeat: int, warmup: int
) -> dict[str, float]:
    """Median seconds of each run; within every repeat, each run once, in turn."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeat):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def profile_onnxruntime(model_dir: Path, batch: np.ndarray, threads: int, top: int = 8) -> None:
    """Run model.onnx once with ONNX Runtime's profiler; print the operators that take most."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    options.profile_file_prefix = str(model_dir / "ort_profile")
    session = onnxruntime.InferenceSession(
        str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    session.run(None, {"images": batch, "image_sizes": whole_batch_sizes(batch)})
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e3
    total = sum(by_op.values())
    ranked = sorted(by_op.items(), key=lambda item: -item[1])[:top]
    listing = ", ".join(f"{op} {ms:.0f} ms ({ms / total:.0%})" for op, ms in ranked)
    print(f"    ONNX Runtime profile, {total:.0f} ms of kernels: {listing}")


def report_row(model: str, size: str, backend: str, latency: dict, throughput: dict, batch: int):
    eager_latency, eager_throughput = latency.get("torch"), throughput.get("torch")
    images_per_second = batch / throughput[backend]
    cells = [f"{model:8}", f"{size:9}", f"{backend:12}", f"{latency[backend] * 1e3:9.0f} ms"]
    cells.append(f"({eager_latency / latency[backend]:4.2f}x)" if eager_latency else "")
    cells.append(f"{images_per_second:7.3f} img/s")
    cells.append(
        f"({images_per_second * eager_throughput / batch:4.2f}x)" if eager_throughput else ""
    )
    print("  ".join(cells))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {args.threads}, device {args.device}, repeat "
        f"{args.repeat}, warmup {args.warmup}, throughput batch {args.batch}"
    )
    header = "model     input      backend       latency (x eager)      throughput (x eager)"
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for name in args.models:
            model_dir = export_paper_model(name, Path(folder))
            engines = load_engines(model_dir, args.device, args.threads)
            for size_text in args.sizes:
                size = parse_size(size_text)
                single, several = batch_of(1, size), batch_of(args.batch, size)
                latency = time_in_turns(forwards(engines, single), args.repeat, args.warmup)
                throughput = time_in_turns(forwards(engines, several), args.repeat, 0)
                rows.append((name, size_text, latency, throughput))
                if args.profile and "onnxruntime" in engines:
                    print(f"  {name} {size_text}:")
                    profile_onnxruntime(model_dir, single, args.threads)
        print(header)
        for name, size_text, latency, throughput in rows:
            for backend in latency:
                report_row(name, size_text, backend, latency, throughput, args.batch)


if __name__ == "__main__":
    if importlib.util.find_spec("onnxruntime") is None:
        sys.exit("benchmarks/runtime.py needs onnxruntime: pip install 'psearch[export]'")
    main()
