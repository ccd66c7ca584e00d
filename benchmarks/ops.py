"""Speed of our ops next to their references, measured side by side in one run.

    python benchmarks/ops.py [--repeat 5] [--warmup 1] [--threads 1]

(a) dynamic RoIAlign: the vectorised custom op against its loop reference;
(b) deformable convolution: our custom op against ONNX Runtime's ``DeformConv`` kernel (CPU).

Prints the shapes, the median time of ``--repeat`` runs after ``--warmup`` runs, the ratios, and
how far the outputs are apart. Both libraries get the same number of threads. A script, not a
test: the numbers depend on the machine.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# Run as a script from anywhere: make the repository's packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ops.deform_conv import deform_conv2d
from models.ops.dynamic_roi_align import dynamic_roi_align
from models.ops.reference.roi import dynamic_roi_align_reference

IMAGE_SIZE = (448, 800)  # (height, width) of the image behind the RoIAlign feature map
STRIDE = 8


def median_seconds(run: Callable[[], object], repeat: int, warmup: int) -> float:
    """Median wall time of ``run()`` over ``repeat`` calls, after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def person_like_rois(count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 5]`` rows ``(0, x1, y1, x2, y2)``: upright boxes of 30-200 px wide, 2-3x as
    tall, clipped to the image."""
    height, width = IMAGE_SIZE
    box_w = 30 + 170 * torch.rand(count, generator=generator)
    box_h = box_w * (2 + torch.rand(count, generator=generator))
    x1 = (width - box_w) * torch.rand(count, generator=generator)
    y1 = ((height - box_h).clamp(min=0)) * torch.rand(count, generator=generator)
    x2, y2 = x1 + box_w, (y1 + box_h).clamp(max=height)
    return torch.stack([torch.zeros(count), x1, y1, x2, y2], dim=1)


def benchmark_dynamic_roi_align(args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(0)
    channels, (height, width) = 256, (IMAGE_SIZE[0] // STRIDE, IMAGE_SIZE[1] // STRIDE)
    features = torch.randn(1, channels, height, width, generator=generator)
    rois = person_like_rois(args.rois, generator)
    # Per-bin (dx, dy) in units of the RoI's size: a few percent, as a trained predictor gives.
    offsets = 0.05 * torch.randn(args.rois, 7, 7, 2, generator=generator)
    options = {"output_size": (7, 7), "spatial_scale": 1 / STRIDE, "sampling_ratio": 2}
    few = args.reference_rois

    def ours() -> torch.Tensor:
        return dynamic_roi_align(features, rois, offsets, **options)

    def reference() -> torch.Tensor:
        return dynamic_roi_align_reference(features, rois[:few], offsets[:few], **options)

    with torch.inference_mode():
        fast_time = median_seconds(ours, args.repeat, args.warmup)
        # Pure Python loops: nothing to warm up.
        slow_time = median_seconds(reference, args.repeat, warmup=0)
        difference = (ours()[:few] - reference()).abs().max().item()

    fast_per_roi, slow_per_roi = fast_time / args.rois, slow_time / few
    print(
        f"(a) dynamic RoIAlign: input 1x{channels}x{height}x{width} (a {IMAGE_SIZE[0]}x"
        f"{IMAGE_SIZE[1]} image at stride {STRIDE}), 7x7 bins, sampling_ratio 2, float32"
    )
    print(
        f"    ours, vectorised   {args.rois:4d} RoIs  {1e3 * fast_time:9.2f} ms  "
        f"{1e3 * fast_per_roi:9.3f} ms/RoI"
    )
    print(
        f"    loop reference     {few:4d} RoIs  {1e3 * slow_time:9.2f} ms  "
        f"{1e3 * slow_per_roi:9.3f} ms/RoI  (fewer RoIs: the loops are slow; compared per RoI)"
    )
    print(
        f"    reference / ours, per RoI: {slow_per_roi / fast_per_roi:.0f}x   "
        f"max |difference| on the first {few} RoIs: {difference:.1e}"
    )


def onnx_deform_conv_session(
    kernel: int, padding: int, modulated: bool, threads: int
):  # -> onnxruntime.InferenceSession
    """A one-node ``DeformConv`` model (opset 19) on ONNX Runtime's CPU provider."""
    import onnxruntime
    from onnx import TensorProto, helper

    names = ["X", "W", "offset", "B", *(["mask"] if modulated else [])]
    ranks = {"X": 4, "W": 4, "offset": 4, "B": 1, "mask": 4}
    node = helper.make_node(
        "DeformConv",
        names,
        ["Y"],
        kernel_shape=[kernel, kernel],
        pads=[padding] * 4,
        strides=[1, 1],
        dilations=[1, 1],
        group=1,
        offset_group=1,
    )
    graph = helper.make_graph(
        [node],
        "deform_conv",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * ranks[n]) for n in names],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 4)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = threads
    session_options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        model.SerializeToString(), session_options, providers=["CPUExecutionProvider"]
    )


def benchmark_deform_conv(args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(0)
    channels, height, width, kernel = 256, 100, 152, 3
    taps = kernel * kernel
    input = torch.randn(1, channels, height, width, generator=generator)
    weight = torch.randn(channels, channels, kernel, kernel, generator=generator) / 48
    bias = torch.randn(channels, generator=generator)
    offset = torch.randn(1, 2 * taps, height, width, generator=generator)
    mask = torch.rand(1, taps, height, width, generator=generator)
    print(
        f"(b) deformable convolution: input 1x{channels}x{height}x{width}, {kernel}x{kernel} "
        f"kernel, padding 1, {channels} outputs, offsets ~ N(0, 1) px, float32"
    )
    for modulated in (False, True):
        session = onnx_deform_conv_session(kernel, 1, modulated, args.threads)
        feeds = {"X": input, "W": weight, "offset": offset, "B": bias}
        if modulated:
            feeds["mask"] = mask
        feeds = {name: tensor.numpy() for name, tensor in feeds.items()}

        def ours(modulated: bool = modulated) -> torch.Tensor:
            return deform_conv2d(
                input, offset, weight, bias, padding=(1, 1), mask=mask if modulated else None
            )

        def onnx_runtime(session=session, feeds=feeds) -> np.ndarray:
            return session.run(None, feeds)[0]

        with torch.inference_mode():
            our_time = median_seconds(ours, args.repeat, args.warmup)
            onnx_time = median_seconds(onnx_runtime, args.repeat, args.warmup)
            difference = np.abs(ours().numpy() - onnx_runtime()).max()
        name = "v2, with mask" if modulated else "v1, no mask  "
        print(
            f"    {name}  ours {1e3 * our_time:8.1f} ms   onnxruntime {1e3 * onnx_time:8.1f} ms"
            f"   ours / onnxruntime: {our_time / onnx_time:.2f}   max |difference|: "
            f"{difference:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="measured runs per case")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs before them")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime")
    parser.add_argument("--rois", type=int, default=100, help="RoIs for our dynamic RoIAlign")
    parser.add_argument(
        "--reference-rois", type=int, default=4, help="RoIs for the (slow) loop reference"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} "
        f"thread(s); median of {args.repeat} runs after {args.warmup} warm-up run(s)"
    )
    benchmark_dynamic_roi_align(args)
    benchmark_deform_conv(args)


if __name__ == "__main__":
    main()
