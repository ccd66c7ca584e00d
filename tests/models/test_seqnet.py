"""SeqNet: configs build, losses reach every module, fixed-size detections, a detection's
embedding is the embedding of its box, results do not depend on the batch."""

from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model
from models.seqnet import SeqNet, SeqNetConfig
from training.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "tiny" / "seqnet_synthetic.yaml"
PAPER_CONFIGS = ["seqnet_r50_cuhk.yaml", "seqnet_r50_prw.yaml"]
LOSSES = {
    "loss_rpn_cls",
    "loss_rpn_reg",
    "loss_proposal_cls",
    "loss_proposal_reg",
    "loss_box_cls",
    "loss_box_reg",
    "loss_box_reid",
}
# Every score above 0 passes: random weights still "detect".
NO_THRESHOLD = "model.inference.score_thresh=0.0"


def _model(*overrides: str, path: Path = TINY) -> SeqNet:
    torch.manual_seed(0)
    return build_model(load_config(path, overrides).model)


def _targets() -> list[dict[str, torch.Tensor]]:
    # Image 0: a labeled and an unlabeled person; image 1: one labeled person.
    return [
        {
            "boxes": torch.tensor([[20.0, 16.0, 70.0, 150.0], [120.0, 30.0, 170.0, 160.0]]),
            "pids": torch.tensor([4, -1]),
        },
        {"boxes": torch.tensor([[60.0, 20.0, 110.0, 170.0]]), "pids": torch.tensor([7])},
    ]


def test_paper_config_has_the_released_settings():
    config = load_config(CONFIGS / "seqnet_r50_prw.yaml")
    model = SeqNetConfig.model_validate(config.model)
    assert (model.backbone.name, model.backbone.norm, model.backbone.frozen_stem) == (
        "resnet50",
        "bn",
        True,
    )
    assert model.rpn.anchors.sizes == ((32, 64, 128, 256, 512),)
    assert (model.rpn.matcher.positive_iou, model.rpn.matcher.negative_iou) == (0.7, (0.0, 0.3))
    assert (model.rpn.train.pre_nms_top_n, model.rpn.train.post_nms_top_n) == (12000, 2000)
    assert (model.rpn.test.pre_nms_top_n, model.rpn.test.post_nms_top_n) == (6000, 300)
    assert model.roi_pool.output_size == (14, 14) and model.roi_pool.sampling_ratio == 2
    assert (model.roi_sampler.num_samples, model.roi_sampler.positive_fraction) == (128, 0.5)
    assert model.box_weights == (10, 10, 5, 5) and model.loss_weights.proposal_reg == 10
    assert model.reid_loss.lut_scale == model.reid_loss.queue_scale == 30
    assert model.reid_loss.momentum == 0.5
    assert (model.reid_loss.num_labeled, model.reid_loss.queue_size) == (483, 500)
    assert (model.inference.score_thresh, model.inference.nms_thresh) == (0.5, 0.4)
    assert (config.optim.lr, config.optim.clip_grad_norm, config.data.batch_size) == (0.003, 10, 5)
    assert config.optim.reference_batch_size == 5 and config.optim.param_groups == []
    assert (config.schedule.epochs, config.schedule.milestones) == (18, [16])
    assert config.eval.query_mode == "gt_box" and config.eval.det_thresh == 0.5


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_builds_and_runs_at_reduced_size(name):
    """ResNet-50 as configured, on small inputs and with few RoIs (each runs res5)."""
    model = _model(
        "model.roi_sampler.num_samples=4",
        "model.rpn.train.post_nms_top_n=8",
        "model.rpn.test.post_nms_top_n=8",
        "model.inference.max_detections=4",
        NO_THRESHOLD,
        path=CONFIGS / name,
    )
    assert sum(p.numel() for p in model.parameters()) > 40e6
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 60.0]]), "pids": torch.tensor([0])}
    with torch.no_grad():
        losses = model.train()(torch.randn(1, 3, 64, 96), [target])
        detections = model.eval()(torch.randn(1, 3, 96, 128))
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())
    assert detections.boxes.shape == (1, 4, 4) and detections.embeddings.shape == (1, 4, 256)


def test_the_tiny_config_builds_and_detects_at_its_own_size():
    config = load_config(TINY)
    assert config.data.dataset == "prw" and config.device == "cpu"
    model = _model().eval()
    size = model.preprocess.min_size, model.preprocess.max_size
    with torch.no_grad():
        detections = model(torch.randn(1, 3, *size))
    assert detections.scores.shape == (1, 50) and detections.embeddings.shape == (1, 50, 64)


def test_res5_lives_in_the_two_heads_only_with_separate_weights():
    model = _model()
    assert len(model.backbone.stage("res5")) == 0
    box_res5, reid_res5 = model.box_head.res5, model.reid_head.res5
    assert box_res5 is not reid_res5
    for a, b in zip(box_res5.parameters(), reid_res5.parameters(), strict=True):
        assert a is not b and torch.equal(a, b)  # the code deep-copies the first head


def test_training_returns_the_named_losses_and_they_reach_every_module():
    model = _model().train()
    losses = model(torch.randn(2, 3, 192, 256), _targets())
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("backbone", "rpn", "box_head", "box_predictor", "reid_head", "embedding"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), name
    assert model.box_regressor.layers[0].weight.grad is not None


def test_the_loss_weights_scale_the_named_losses():
    torch.manual_seed(1)
    plain = _model().train()
    weighted = _model("model.loss_weights.proposal_reg=20.0", "model.loss_weights.rpn_cls=0.5")
    weighted.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 192, 256)
    torch.manual_seed(2)
    a = plain(images, _targets())
    torch.manual_seed(2)  # the same draws of anchors and RoIs
    b = weighted.train()(images, _targets())
    torch.testing.assert_close(b["loss_proposal_reg"], 2 * a["loss_proposal_reg"])
    torch.testing.assert_close(b["loss_rpn_cls"], 0.5 * a["loss_rpn_cls"])


def test_oim_learns_from_the_labeled_positives_and_queues_the_unlabeled():
    model = _model().train()
    model(torch.randn(2, 3, 192, 256), _targets())
    lut, queue = model.reid_loss.lut, model.reid_loss.queue
    assert lut[4].norm() > 0 and lut[7].norm() > 0  # the two labeled persons
    assert lut.norm(dim=1).gt(0).sum() == 2
    assert int(model.reid_loss.queue_ptr) > 0 and queue.norm(dim=1).gt(0).any()


def test_inference_gives_fixed_size_sorted_detections_with_unit_embeddings():
    model = _model(NO_THRESHOLD).eval()
    with torch.no_grad():
        detections = model(torch.randn(2, 3, 192, 256))
    boxes, scores, embeddings = detections
    assert boxes.shape == (2, 50, 4) and embeddings.shape == (2, 50, 64)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    used = scores > 0
    assert used.any()
    torch.testing.assert_close(embeddings[used].norm(dim=1), torch.ones(int(used.sum())))
    assert (embeddings[~used] == 0).all() and (boxes[~used] == 0).all()
    assert model.confidence_weighted_similarity


def test_the_score_threshold_keeps_exactly_the_detections_scored_above_it():
    """Thresholding first or last gives the same detections: a box under the threshold can
    only suppress boxes scored lower still, so the survivors above it do not change."""
    images = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        low = _model(NO_THRESHOLD).eval()(images)
        threshold = float(low.scores[0, 3])
        high = _model(f"model.inference.score_thresh={threshold}").eval()(images)
    kept = low.scores[0] > threshold
    assert kept.sum() == 3
    torch.testing.assert_close(high.scores[0, :3], low.scores[0][kept])
    torch.testing.assert_close(high.boxes[0, :3], low.boxes[0][kept])
    assert (high.scores[0, 3:] == 0).all()


def _without_refinement(model: SeqNet) -> SeqNet:
    """Zero the re-id head's box regressor: the refined boxes are the first-stage boxes."""
    with torch.no_grad():
        for parameter in model.box_regressor.parameters():
            parameter.zero_()
    return model


def test_a_detected_box_embedded_through_embed_boxes_gives_the_detections_embedding():
    """A detection's embedding is the re-id head's embedding of its first-stage box; without
    the refinement that box is the detected box, so embedding the detected box as a query
    (GT-box mode) gives back the detection's own embedding."""
    model = _without_refinement(_model(NO_THRESHOLD)).eval()
    images = torch.randn(2, 3, 192, 256)
    with torch.no_grad():
        detections = model(images)
        for image in range(2):
            used = detections.scores[image] > 0
            boxes = detections.boxes[image][used]
            queries = model.embed_boxes(images[image : image + 1], [boxes])
            torch.testing.assert_close(
                queries, detections.embeddings[image][used], atol=1e-4, rtol=1e-4
            )


def test_embed_boxes_embeds_each_images_boxes_and_clips_them():
    model = _model().eval()
    images = torch.randn(2, 3, 192, 256)
    box = torch.tensor([[20.0, 16.0, 70.0, 150.0]])
    past_the_border = torch.tensor([[200.0, 100.0, 400.0, 300.0]])
    with torch.no_grad():
        both = model.embed_boxes(images, [box, torch.cat([box, past_the_border])])
        first = model.embed_boxes(images[:1], [box])
        clipped = model.embed_boxes(images[1:], [torch.tensor([[200.0, 100.0, 256.0, 192.0]])])
    assert both.shape == (3, 64)
    torch.testing.assert_close(both.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)  # another image, another embedding
    torch.testing.assert_close(both[2:], clipped, atol=1e-5, rtol=1e-5)


class PaddingBlindFeatures(nn.Module):
    """res4 in place of the ResNet that, unlike it, cannot see the padding: each stride-16
    cell is a linear map (no bias) of its own 16 x 16 pixels, so zero pixels give zero
    features whether they are an image's border or a batch's padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cells = nn.Conv2d(3, channels, 16, stride=16, bias=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"res4": self.cells(images)}


def test_an_image_gets_the_same_detections_in_any_padded_batch():
    """A 64 x 96 image padded to 96 x 128 alone, or to 128 x 160 next to a larger image: with
    ``image_sizes`` the detections are the same (proposals from the image's own extent, boxes
    clipped to it). Features here cannot see past the image, as a CNN's receptive field does,
    and RoIAlign reads zeros past the image in both batches."""
    model = _model(NO_THRESHOLD).eval()
    model.backbone = PaddingBlindFeatures(model.rpn.head.conv.in_channels)
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(3, 64, 96, generator=generator)
    alone = torch.zeros(1, 3, 96, 128)
    alone[0, :, :64, :96] = small
    batch = torch.zeros(2, 3, 128, 160)
    batch[0, :, :64, :96] = small
    batch[1] = torch.randn(3, 128, 160, generator=generator)
    with torch.no_grad():
        single = model(alone, image_sizes=torch.tensor([[64, 96]]))
        batched = model(batch, image_sizes=torch.tensor([[64, 96], [128, 160]]))
        unsized = model(batch)
    assert (single.scores > 0).sum() > 3
    for name, value in single._asdict().items():
        torch.testing.assert_close(getattr(batched, name)[:1], value, rtol=1e-4, atol=1e-4)
    assert (batched.boxes[0, :, 2] <= 96).all() and (batched.boxes[0, :, 3] <= 64).all()
    assert (unsized.boxes[0, :, 2] > 96).any()  # without image_sizes, the padding is image


def test_training_without_targets_and_malformed_targets_are_errors():
    model = _model().train()
    with pytest.raises(ValueError, match="needs targets"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="pids"):
        model(torch.randn(1, 3, 64, 64), [{"boxes": torch.zeros(1, 4)}])


def test_an_image_without_persons_trains_as_background():
    model = _model().train()
    empty = {"boxes": torch.zeros(0, 4), "pids": torch.zeros(0, dtype=torch.long)}
    losses = model(torch.randn(2, 3, 128, 192), [_targets()[1], empty])
    assert all(torch.isfinite(v) for v in losses.values())


def test_training_inference_and_box_queries_run_under_autocast():
    """Mixed precision (the trainer's CUDA float16; bfloat16 is CPU's): boxes, RoIs and losses
    stay float32."""
    model = _model(NO_THRESHOLD)
    images = torch.randn(2, 3, 192, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.train()(images, _targets())
        with torch.no_grad():
            detections = model.eval()(images)
            queries = model.embed_boxes(images, [t["boxes"] for t in _targets()])
    assert all(torch.isfinite(value) and value.dtype == torch.float32 for value in losses.values())
    assert detections.boxes.dtype == torch.float32 and (detections.scores > 0).any()
    assert torch.isfinite(queries).all() and queries.shape == (3, 64)
