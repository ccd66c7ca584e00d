"""Score a predictions file with the standard protocol: ``python -m training.evaluate``.

    python -m training.evaluate --dataset prw --root data/PRW --predictions preds.npz

prints mAP and top-1/5/10 (PRW: all cameras and cross-camera), the number of queries evaluated,
the detection threshold used and the detection AP / recall; for CrowdHuman MR^-2, AP and recall.
Bad input ends with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

from PIL import Image

from training.datasets import PersonSearchSplit, load_dataset
from training.evaluation import predictions as predictions_format
from training.evaluation.cbgm import cbgm_parameters
from training.evaluation.detection import evaluate_detections
from training.evaluation.miss_rate import evaluate_pedestrian_detection
from training.evaluation.predictions import Predictions, load_predictions
from training.evaluation.search import TOP_K, SearchResult, evaluate_search

SEARCH_DATASETS = ("cuhk_sysu", "prw")
DATASETS = (*SEARCH_DATASETS, "crowdhuman")
DEFAULT_SPLIT = {"cuhk_sysu": "test", "prw": "test", "crowdhuman": "val"}
DEFAULT_GALLERY_SIZE = 100
DEFAULT_DET_THRESH = {"cuhk_sysu": 0.5, "prw": 0.5, "crowdhuman": 0.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate person search or pedestrian detection predictions with the "
        "protocol of the literature (docs/evaluation.md).",
        epilog=predictions_format.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, help="the dataset folder, as distributed")
    parser.add_argument("--predictions", required=True, help="a predictions .npz file (below)")
    parser.add_argument("--split", help="split to evaluate (default: test; val for crowdhuman)")
    parser.add_argument(
        "--gallery-size",
        type=int,
        help=f"CUHK-SYSU gallery size: 50, 100, 500, 1000, 2000, 4000, or -1 for the full "
        f"gallery (default {DEFAULT_GALLERY_SIZE})",
    )
    parser.add_argument(
        "--det-thresh",
        type=float,
        help="keep detections scored >= this (default 0.5; 0 for crowdhuman, where the "
        "miss-rate curve uses every detection)",
    )
    parser.add_argument(
        "--cbgm",
        action="store_true",
        help="re-score with context bipartite graph matching (k1, k2 = 10, 3 on CUHK-SYSU; "
        "30, 4 on PRW)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(_run(args))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> str:
    if args.gallery_size is not None and args.dataset != "cuhk_sysu":
        raise ValueError("--gallery-size applies to cuhk_sysu only")
    if args.cbgm and args.dataset not in SEARCH_DATASETS:
        raise ValueError("--cbgm applies to person search datasets (cuhk_sysu, prw) only")
    det_thresh = DEFAULT_DET_THRESH[args.dataset] if args.det_thresh is None else args.det_thresh
    split_name = args.split or DEFAULT_SPLIT[args.dataset]
    options = {}
    if args.dataset == "cuhk_sysu":
        options["gallery_size"] = (
            DEFAULT_GALLERY_SIZE if args.gallery_size is None else args.gallery_size
        )
    split = load_dataset(args.dataset, args.root, split_name, **options)
    predictions = load_predictions(args.predictions)
    predictions.check_split(split, search=args.dataset in SEARCH_DATASETS)
    gallery = f", gallery size {options['gallery_size']}" if options else ""
    header = [f"dataset      {_describe(split)}{gallery}", f"predictions  {args.predictions}"]
    if args.dataset == "crowdhuman":
        body = _pedestrian_report(split, predictions, det_thresh)
    else:
        body = _search_report(split, predictions, det_thresh, args.cbgm)
    return "\n".join([*header, body])


def _describe(split: PersonSearchSplit) -> str:
    queries = f", {len(split.queries)} queries" if split.queries else ""
    return f"{split.dataset} {split.split} ({len(split.images)} images{queries})"


def _search_report(
    split: PersonSearchSplit, predictions: Predictions, det_thresh: float, cbgm: bool
) -> str:
    assert predictions.embeddings is not None  # check_split(search=True) made sure
    cross_camera_settings = {"all cameras": False, "cross-camera": True}
    protocols = cross_camera_settings if split.dataset == "prw" else {"gallery": False}
    results = {
        name: evaluate_search(
            split,
            predictions.detections,
            predictions.embeddings,
            predictions.query_embeddings,
            det_thresh=det_thresh,
            cross_camera=cross_camera,
            cbgm=cbgm,
        )
        for name, cross_camera in protocols.items()
    }
    first = next(iter(results.values()))
    detection = evaluate_detections(split.images, predictions.detections, det_thresh)
    k1, k2 = cbgm_parameters(split.dataset)
    cbgm_line = f"on (k1={k1}, k2={k2})" if cbgm else "off"
    lines = [
        f"queries      {_describe_queries(first)}",
        f"det_thresh   {det_thresh:g}",
        f"CBGM         {cbgm_line}",
        "",
        _search_table(results),
        "",
        f"detection    AP {100 * detection.average_precision:.2f}   recall "
        f"{100 * detection.recall:.2f}   (mutual-best IoU >= {detection.iou_thresh:g}, "
        f"score >= {det_thresh:g}, {detection.num_gt} GT boxes)",
    ]
    return "\n".join(lines)


def _describe_queries(result: SearchResult) -> str:
    if result.query_mode == "gt_box":
        return "embeddings of the GT query boxes"
    return (
        f"max-IoU detections of the query images; {result.num_low_iou_queries} of "
        f"{result.num_queries} have best IoU < 0.5"
    )


def _search_table(results: Mapping[str, SearchResult]) -> str:
    top_k = "".join(f"{f'top-{k}':>8}" for k in TOP_K)
    rows = [f"{'protocol':<14}{'queries':>8}{'mAP':>8}{top_k}"]
    for name, result in results.items():
        accuracy = "".join(f"{100 * result.top_k[k]:>8.2f}" for k in TOP_K)
        row = f"{name:<14}{result.num_queries:>8}{100 * result.mean_average_precision:>8.2f}"
        rows.append(row + accuracy)
        if result.num_queries_without_positives:
            rows.append(
                f"  ({result.num_queries_without_positives} queries have no positive in their "
                f"gallery and score 0)"
            )
    return "\n".join(rows)


def _pedestrian_report(
    split: PersonSearchSplit, predictions: Predictions, det_thresh: float
) -> str:
    detections = {
        name: boxes[boxes[:, 4] >= det_thresh] for name, boxes in predictions.detections.items()
    }
    result = evaluate_pedestrian_detection(
        split.images, detections, image_sizes=_image_sizes(split, predictions)
    )
    lines = [
        f"boxes        {result.num_gt} persons, {result.num_ignore_regions} ignore regions",
        f"det_thresh   {det_thresh:g}",
        "",
        f"{'MR^-2':>8}{'AP':>8}{'recall':>8}",
        f"{100 * result.log_average_miss_rate:>8.2f}{100 * result.average_precision:>8.2f}"
        f"{100 * result.recall:>8.2f}",
    ]
    return "\n".join(lines)


def _image_sizes(
    split: PersonSearchSplit, predictions: Predictions
) -> Mapping[str, tuple[int, int]]:
    """Image sizes for clipping boxes: from the predictions file, else from the image headers."""
    if predictions.image_sizes is not None:
        return predictions.image_sizes
    sizes = {}
    for annotation in split.images:
        try:
            with Image.open(annotation.path) as image:
                sizes[annotation.name] = image.size
        except OSError as error:
            raise OSError(
                f"cannot read the size of {annotation.path} ({error}); store image_sizes in "
                f"the predictions file instead"
            ) from error
    return sizes


if __name__ == "__main__":
    sys.exit(main())
