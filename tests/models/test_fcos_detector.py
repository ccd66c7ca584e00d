"""The FCOS pedestrian detector (LLA.FCOS): configs build, losses train, fixed-size outputs."""

from pathlib import Path

import pytest
import torch

from models.fcos_detector import FCOSDetector, FCOSDetectorConfig
from models.types import Detections
from training.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _detector(path: Path, *overrides: str) -> FCOSDetector:
    return FCOSDetector(FCOSDetectorConfig.model_validate(load_config(path, overrides).model))


@pytest.fixture(scope="module")
def tiny() -> FCOSDetector:
    torch.manual_seed(0)
    return _detector(CONFIGS / "tiny" / "lla_fcos_synthetic.yaml")


def _targets() -> list[dict[str, torch.Tensor]]:
    # Image 0: a labeled and an unlabeled person; image 1: nobody.
    return [
        {
            "boxes": torch.tensor([[10.0, 8.0, 50.0, 110.0], [70.0, 20.0, 120.0, 120.0]]),
            "pids": torch.tensor([4, -1]),
        },
        {"boxes": torch.zeros(0, 4), "pids": torch.zeros(0, dtype=torch.long)},
    ]


def test_model_exposes_its_config_preprocessing_and_embedding_dim(tiny):
    assert tiny.config.name == "fcos" and tiny.config.head.assigner.name == "lla"
    assert tiny.preprocess is tiny.config.preprocess
    assert tiny.embedding_dim == 0
    assert tiny.strides == [8, 16, 32, 64, 128]


def test_training_forward_returns_named_finite_losses_that_reach_every_module(tiny):
    tiny.train()
    tiny.zero_grad()
    losses = tiny(torch.randn(2, 3, 128, 128), _targets())
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for module in ("backbone", "fpn", "head"):
        grads = [p.grad for p in getattr(tiny, module).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), module
        assert sum(g.abs().sum() for g in grads) > 0, module


def test_inference_gives_fixed_size_sorted_detections_without_embeddings():
    # No score threshold, so that the untrained model's low scores fill some of the K slots.
    torch.manual_seed(0)
    path = CONFIGS / "tiny" / "lla_fcos_synthetic.yaml"
    model = _detector(path, "model.inference.score_thresh=0.0").eval()
    with torch.no_grad():
        detections = model(torch.randn(2, 3, 96, 128))
    assert isinstance(detections, Detections)
    k = model.config.inference.max_detections
    assert detections.boxes.shape == (2, k, 4)
    assert detections.scores.shape == (2, k)
    assert detections.embeddings.shape == (2, k, 0)
    scores = detections.scores
    assert (scores[:, :-1] >= scores[:, 1:]).all() and (scores >= 0).all()
    unused = scores == 0
    assert (~unused).sum() > 0 and (detections.boxes[unused] == 0).all()
    x, y = detections.boxes[..., 0::2], detections.boxes[..., 1::2]
    assert (x >= 0).all() and (x <= 128).all() and (y >= 0).all() and (y <= 96).all()


def test_an_image_is_detected_only_inside_its_own_size_in_a_padded_batch():
    """The same 96 x 128 input, once as a whole image and once as a 64 x 80 image in its
    padding: the boxes stay inside the image, and fewer locations detect. (No threshold, no
    suppression and more slots than locations: every location inside an image detects.)"""
    torch.manual_seed(0)
    path = CONFIGS / "tiny" / "lla_fcos_synthetic.yaml"
    model = _detector(
        path,
        "model.inference.score_thresh=0.0",
        "model.inference.nms_thresh=1.0",
        "model.inference.max_detections=300",
        "model.inference.pre_nms_top_k=300",
    ).eval()
    images = torch.randn(1, 3, 96, 128).expand(2, -1, -1, -1)
    with torch.no_grad():
        detections = model(images, image_sizes=torch.tensor([[96, 128], [64, 80]]))
    whole, padded = (detections.scores > 0).sum(dim=1)
    assert 0 < padded < whole
    x, y = detections.boxes[..., 0::2], detections.boxes[..., 1::2]
    assert (x[1] <= 80).all() and (y[1] <= 64).all()
    assert (x[0] > 80).any() and (y[0] > 64).any()


def test_paper_config_builds_and_runs_at_reduced_size():
    torch.manual_seed(0)
    model = _detector(CONFIGS / "lla_fcos_r50_crowdhuman.yaml")
    cfg = model.config
    assert (cfg.preprocess.min_size, cfg.preprocess.max_size) == (800, 1400)
    assert cfg.head.quality == "iou" and cfg.inference.nms_thresh == 0.6
    images = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        losses = model.train()(images, _targets())
        detections = model.eval()(images)
    assert all(torch.isfinite(v) for v in losses.values())
    assert detections.boxes.shape == (2, cfg.inference.max_detections, 4)


def test_lla_configs_carry_the_released_codes_settings():
    # github.com/Megvii-BaseDetection/LLA, lla.res50.fpn.crowdhuman.800size.30k: REG_COST 1.5,
    # C_inbox 1e3, GIoU x 2 and IoU-branch BCE x 0.5 over the positives; per level the 1000 most
    # probable locations, those above 0.05, scored sqrt(probability x IoU); 300 per image.
    for path in (
        CONFIGS / "lla_fcos_r50_crowdhuman.yaml",
        CONFIGS / "tiny/lla_fcos_synthetic.yaml",
    ):
        cfg = FCOSDetectorConfig.model_validate(load_config(path, []).model)
        lla = cfg.head.assigner
        assert (lla.name, lla.top_k, lla.reg_weight, lla.inbox_cost) == ("lla", 10, 1.5, 1000.0)
        head = cfg.head
        assert (head.quality, head.box_loss, head.box_loss_weights) == ("iou", "giou", "uniform")
        losses = (head.cls_loss_weight, head.box_loss_weight, head.quality_loss_weight)
        assert losses == (1.0, 2.0, 0.5) and head.box_loss_normalizer == "positives"
        inference = cfg.inference
        assert (inference.rank_by, inference.score, inference.score_thresh) == (
            "class",
            "sqrt_product",
            0.05,
        )
    assert cfg.inference.pre_nms_top_k == 200  # the tiny one; the paper config's is 1000
    paper = FCOSDetectorConfig.model_validate(
        load_config(CONFIGS / "lla_fcos_r50_crowdhuman.yaml", []).model
    )
    assert (paper.inference.pre_nms_top_k, paper.inference.max_detections) == (1000, 300)


def test_the_fcos_baseline_differs_from_lla_fcos_only_in_the_method():
    # LLA's claim (Table 1) compares FCOS with center sampling against LLA.FCOS: the two tiny
    # configs must be the same detector, data and schedule.
    lla = load_config(CONFIGS / "tiny/lla_fcos_synthetic.yaml", [])
    fcos = load_config(CONFIGS / "tiny/fcos_synthetic.yaml", [])
    method = {"assigner", "quality", "box_loss_weights", "box_loss_weight", "quality_loss_weight"}
    lla_head, fcos_head = lla.model["head"], fcos.model["head"]
    assert {k for k in lla_head | fcos_head if lla_head.get(k) != fcos_head.get(k)} == method
    for section in ("backbone", "fpn", "preprocess", "inference"):
        assert lla.model[section] == fcos.model[section], section
    for section in ("data", "optim", "schedule", "eval"):
        assert getattr(lla, section) == getattr(fcos, section), section
    assert fcos_head["assigner"]["name"] == "center_sampling"
    assert fcos_head["quality"] == "centerness" and fcos_head["box_loss_weights"] == "centerness"


def test_ignore_regions_in_the_targets_change_what_the_detector_trains_on():
    # The same image and person, once with a crowd marked as an ignore region: the K locations
    # the region claims leave the classification loss, which drops; the person's box loss does
    # not change. (Person probability 0.5 everywhere, so that every negative costs the same.)
    torch.manual_seed(0)
    model = _detector(CONFIGS / "tiny" / "lla_fcos_synthetic.yaml").train()
    torch.nn.init.zeros_(model.head.cls_logits.bias)
    images = torch.randn(1, 3, 128, 128)
    person = {"boxes": torch.tensor([[10.0, 8.0, 50.0, 110.0]]), "pids": torch.tensor([-1])}
    crowd = person | {"ignore_boxes": torch.tensor([[70.0, 20.0, 120.0, 120.0]])}
    plain, ignoring = model(images, [person]), model(images, [crowd])
    assert ignoring["loss_cls"].item() < 0.99 * plain["loss_cls"].item()
    assert ignoring["loss_box"].item() == pytest.approx(plain["loss_box"].item(), rel=1e-5)


def test_a_few_steps_on_one_batch_lower_the_loss():
    torch.manual_seed(0)
    model = _detector(CONFIGS / "tiny" / "lla_fcos_synthetic.yaml").train()
    images, targets = torch.randn(2, 3, 128, 128), _targets()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    totals = []
    for _ in range(8):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    assert totals[-1] < 0.8 * totals[0], totals


def test_head_and_fpn_must_agree():
    with pytest.raises(ValueError, match="in_channels"):
        FCOSDetectorConfig.model_validate({"fpn": {"channels": 64}})
    with pytest.raises(ValueError, match="num_levels"):
        FCOSDetectorConfig.model_validate(
            {"fpn": {"extra_levels": 0}, "head": {"assigner": {"name": "lla"}}}
        )
