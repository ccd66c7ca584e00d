"""``psearch-export``: turn a training run into a deployable model folder (``python -m export``
is the same).

::

    psearch-export --checkpoint RUN_DIR --out MODEL_DIR [--format onnx|tensorrt|all]

writes ``checkpoint.safetensors``, ``model.onnx``, ``model.plugins.onnx`` (and, for RoI models,
``embed.onnx`` / ``embed.plugins.onnx``) and ``psearch.json`` (export/artifact.py), then checks
that ONNX Runtime reproduces the PyTorch model (export/parity.py), prints the comparison and
records it in the manifest. ``--format tensorrt`` (or ``all``: the same, the engine is built
from the ONNX plugin graph) then builds the TensorRT engine of this machine's GPU
(``export.tensorrt``), once parity has passed.

Exit status: 0 done; 1 parity failed (the files are written, for inspection: do not deploy them);
2 a mistake the user can fix (a missing file, an existing output folder, TensorRT asked for where
it cannot be used), with a one-line message and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from export.artifact import (
    MODEL_MANIFEST_FILE,
    ArtifactError,
    GraphFiles,
    ModelManifest,
    ParityRecord,
    build_manifest,
    load_run,
    run_detection_threshold,
    write_model_manifest,
    write_weights,
)
from export.onnx import ExportError, write_onnx_graphs
from export.parity import (
    ParityReport,
    check_parity,
    eager_detect,
    eager_embed,
    onnxruntime_detect,
    onnxruntime_embed,
    parity_inputs,
)
from export.runtime import BackendUnavailableError, ensure_tensorrt_engines

USER_ERROR = 2
PARITY_FAILED = 1
FORMATS = ("onnx", "tensorrt", "all")


class UsageError(Exception):
    """A mistake the user can fix; its message is printed as is."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="psearch-export",
        description="Export a trained person search model to ONNX (and TensorRT).",
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, metavar="RUN_DIR", help="training run folder"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="MODEL_DIR", help="model folder to write"
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx",
        help="onnx: the ONNX graphs; tensorrt or all: also the TensorRT engine of this GPU "
        "(needs TensorRT and the GPU that will run it) (default: onnx)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing model folder's files"
    )
    parser.add_argument(
        "--skip-parity", action="store_true", help="do not compare ONNX Runtime with PyTorch"
    )
    return parser.parse_args(argv)


def check_tensorrt_available() -> None:
    """Refuse a TensorRT export up front, before minutes of ONNX export."""
    from export.tensorrt import TensorRTUnavailableError, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailableError as error:
        raise UsageError(f"--format tensorrt: {error}") from None
    if not torch.cuda.is_available():
        raise UsageError(
            "--format tensorrt: engines are built on the GPU that runs them, and no CUDA GPU "
            "is visible here; export with --format onnx and build the engine on the GPU machine"
        )


def check_output_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if (out / MODEL_MANIFEST_FILE).exists() and not overwrite:
        raise UsageError(f"--out {out}: already holds an exported model; add --overwrite")


def run_parity(model: nn.Module, out: Path, manifest: ModelManifest) -> ParityReport:
    """ONNX Runtime (CPU) vs PyTorch eager on synthetic images of the model's input sizes."""
    batches, queries = parity_inputs(model.preprocess)
    graphs = manifest.onnx
    embeds = graphs is not None and graphs.embed is not None
    return check_parity(
        eager_detect(model),
        onnxruntime_detect(str(out / graphs.detect)),
        batches,
        queries=queries,
        reference_embed=eager_embed(model) if embeds else None,
        candidate_embed=onnxruntime_embed(str(out / graphs.embed)) if embeds else None,
    )


def export_checkpoint(
    run_dir: Path, out: Path, *, parity: bool = True, log: Callable[[str], None] = print
) -> tuple[ModelManifest, ParityReport | None]:
    """Write the model folder of a training run (ONNX format) and check its parity."""
    model = load_run(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(model, run_detection_threshold(run_dir))
    log(f"{manifest.name}: fingerprint {manifest.fingerprint}")
    if manifest.detection_threshold is not None:
        log(f"recommended detection threshold {manifest.detection_threshold:g} (eval.det_thresh)")
    write_weights(model, out, manifest)
    manifest.onnx = GraphFiles(**write_onnx_graphs(model, out))
    log(f"wrote {', '.join(_graph_files(manifest.onnx))} to {out}")
    report = run_parity(model, out, manifest) if parity else None
    if report is not None:
        log(report.summary())
        manifest.parity = ParityRecord(
            passed=report.passed,
            compared=report.compared,
            max_box_error=report.max_box_error,
            max_score_error=report.max_score_error,
            min_cosine=report.min_cosine,
        )
    write_model_manifest(manifest, out)
    return manifest, report


def _graph_files(graphs: GraphFiles) -> list[str]:
    names = [graphs.detect, graphs.detect_plugins, graphs.embed, graphs.embed_plugins]
    return [name for name in names if name]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    engine = args.format in ("tensorrt", "all")
    try:
        if engine:
            check_tensorrt_available()
        check_output_folder(args.out, args.overwrite)
        manifest, report = export_checkpoint(args.checkpoint, args.out, parity=not args.skip_parity)
    except (UsageError, ArtifactError, ExportError) as error:
        print(f"psearch-export: error: {' '.join(str(error).split())}", file=sys.stderr)
        return USER_ERROR
    if report is not None and not report.passed:
        print(
            "psearch-export: parity FAILED: ONNX Runtime does not reproduce the PyTorch model; "
            f"the files in {args.out} are for inspection, do not deploy them",
            file=sys.stderr,
        )
        return PARITY_FAILED
    if engine:
        try:
            for path in ensure_tensorrt_engines(args.out, manifest).values():
                print(f"built {path.name}")
        except BackendUnavailableError as error:  # e.g. a driver too old for the plugins
            print(f"psearch-export: error: {error}", file=sys.stderr)
            return USER_ERROR
    return 0
