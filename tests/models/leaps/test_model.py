"""The whole LEAPS model: losses in training, fixed-size detections at inference, gradients,
learning on a tiny batch, and the ablation switches of the paper's tables."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from models.leaps import Leaps, LeapsConfig
from models.leaps.reid_head import HierarchicalInteractionReidModule, PlainReidModule
from models.ops.deform_conv import DeformConvPack
from models.preprocess import pad_batch
from models.types import Detections

STAGE_LOSSES = ("loss_cls", "loss_l1", "loss_giou")
HEAD_REID_LOSSES = ("loss_oim_prm", "loss_triplet_prm", "loss_oim_hirm", "loss_triplet_hirm")
PER_HEAD = {"shared_memory": False}  # one OIM memory per (stage, branch): losses per head


def _losses(model: Leaps, batch) -> dict[str, torch.Tensor]:
    images, targets = batch
    return model.train()(images, targets)


def test_training_returns_every_stage_loss_and_one_re_id_loss_over_the_last_two(make_model, batch):
    losses = _losses(make_model(), batch)
    expected = {f"{name}_s{stage}" for stage in (1, 2, 3) for name in STAGE_LOSSES}
    expected |= {"loss_div_s2", "loss_div_s3", "loss_oim", "loss_triplet"}
    assert set(losses) == expected
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name


def test_one_memory_serves_every_head_as_in_the_paper_or_one_memory_per_head(make_model, batch):
    shared, per_head = make_model(), make_model(reid_loss=PER_HEAD)
    assert list(shared.reid_criterion.memories) == ["shared"]
    assert list(per_head.reid_criterion.memories) == ["s2_prm", "s2_hirm", "s3_prm", "s3_hirm"]
    losses = _losses(per_head, batch)
    reid = {f"{name}_s{stage}" for stage in (2, 3) for name in HEAD_REID_LOSSES}
    assert reid <= set(losses) and "loss_oim" not in losses


def test_the_shared_memory_learns_each_labeled_person_from_every_head_once_per_iteration(
    make_model, batch
):
    # The memory is updated once per iteration, with the samples of both branches of both re-id
    # stages (each branch's samples are its stage's); with momentum 0 a row becomes its
    # person's last sample, normalised.
    model = make_model(reid_loss={"momentum": 0.0})
    _, targets = batch
    pid = int(targets[0]["pids"][targets[0]["pids"] >= 0][0])
    memory = model.reid_criterion.memories["shared"]
    seen = []
    original = memory.update_memory
    memory.update_memory = lambda features, pids: (
        seen.append(pids.clone()) or original(features, pids)
    )
    _losses(model, batch)
    assert len(seen) == 1
    (pids,) = seen
    assert (pids == pid).sum() % 2 == 0 and (pids == pid).sum() > 0  # both branches, same samples
    assert memory.lut[pid].norm() == pytest.approx(1.0)


def test_initial_proposals_cover_each_whole_image_not_the_padded_batch(make_model):
    model = make_model()
    boxes, features = model.initial_proposals(torch.tensor([[64.0, 96.0], [40.0, 30.0]]))
    assert boxes.shape == (2, 6, 4) and features.shape == (2, 6, 16)
    assert torch.equal(boxes[0], torch.tensor([0.0, 0.0, 96.0, 64.0]).expand(6, 4))
    assert torch.equal(boxes[1], torch.tensor([0.0, 0.0, 30.0, 40.0]).expand(6, 4))


def test_learned_proposals_are_relative_to_each_images_size(make_model):
    """A proposal (cx, cy, w, h) = (0.25, 0.5, 0.5, 1.0) is the left half of every image."""
    model = make_model()
    with torch.no_grad():
        model.proposal_boxes[0] = torch.tensor([0.25, 0.5, 0.5, 1.0])
    boxes, _ = model.initial_proposals(torch.tensor([[64, 96], [40, 30]]))
    assert boxes[:, 0].tolist() == [[0.0, 0.0, 48.0, 64.0], [0.0, 0.0, 15.0, 40.0]]


class PaddingBlindFeatures(nn.Module):
    """P3 and P4 in place of ResNet + FPN that, unlike them, cannot see the padding: each cell
    is a linear map (no bias) of its own 8x8 or 16x16 pixels, so zero pixels give zero features
    whether they are an image's content or the batch's padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.p3 = nn.Conv2d(3, channels, 8, stride=8, bias=False)
        self.p4 = nn.Conv2d(3, channels, 16, stride=16, bias=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"p3": self.p3(images), "p4": self.p4(images)}


def test_an_image_gets_the_same_detections_alone_and_padded_next_to_a_larger_one(make_model):
    """A 64 x 96 image, alone or zero-padded to 128 x 160 in a batch with a larger image: with
    ``image_sizes`` the heads see the same image (the features here cannot tell the padding
    from the image's black border); without, the proposals cover the padding."""
    model = make_model().eval()
    model.backbone, model.fpn = nn.Identity(), PaddingBlindFeatures(16)
    generator = torch.Generator().manual_seed(0)
    small = torch.zeros(3, 64, 96)
    small[:, :48, :80] = torch.randn(3, 48, 80, generator=generator)  # a black 16-pixel border
    large = torch.randn(3, 128, 160, generator=generator)
    images, image_sizes = pad_batch([small, large], 32)
    with torch.no_grad():
        alone = model(small[None])
        batched = model(images, image_sizes=image_sizes)
        unsized = model(images)
    for name, value in alone._asdict().items():
        # Equal up to float rounding, which differs with the batch's shape.
        torch.testing.assert_close(getattr(batched, name)[:1], value, rtol=1e-4, atol=1e-4)
    assert (batched.boxes[1, :, 2] > 96).any()  # the larger image's boxes are its own
    assert not torch.allclose(unsized.boxes[:1], alone.boxes, atol=1.0)


def test_gradients_reach_the_learnable_proposals_and_every_head(make_model, batch):
    model = make_model()
    # Untrained stages may push boxes off the image, where RoIAlign samples have no position
    # gradient; zero deltas keep every stage on the whole image (the initial proposals).
    with torch.no_grad():
        for stage in model.stages:
            stage.box_deltas.weight.zero_()
            stage.box_deltas.bias.zero_()
    sum(_losses(model, batch).values()).backward()
    learned = {
        "proposal boxes": model.proposal_boxes,
        "proposal features": model.proposal_features,
        "backbone stem": model.backbone.conv1.weight,
        "fpn": model.fpn.lateral[0].weight,
        "first detection stage": model.stages[0].instance_interaction.weight_generator.weight,
        "dynamic RoIAlign offsets": model.reid_heads[-1].offset_predictor.weight,
        "PRM": model.reid_heads[0].branches[0].fc1.weight,
        "HIRM": model.reid_heads[-1].branches[1].intra_instance.weight_generator.weight,
    }
    for name, parameter in learned.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_a_few_steps_on_one_batch_lower_the_loss(make_model, batch):
    # Zero initial deltas keep the untrained cascade on the image; without a queue the OIM
    # targets are the lookup table rows only, which follow the features (a queue of the same
    # unlabeled person's past features makes single-batch OIM values jumpy).
    model = make_model(reid_loss={"queue_size": 0})
    with torch.no_grad():
        for stage in model.stages:
            stage.box_deltas.weight.zero_()
            stage.box_deltas.bias.zero_()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(10):
        total = sum(_losses(model, batch).values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.8 * totals[0], totals


def test_inference_returns_every_proposal_sorted_without_nms(make_model, batch):
    model = make_model().eval()
    images, _ = batch
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, Detections)
    assert out.boxes.shape == (2, 6, 4)
    assert out.scores.shape == (2, 6)
    assert out.embeddings.shape == (2, 6, model.embedding_dim) == (2, 6, 16)
    assert torch.all(out.scores[:, :-1] >= out.scores[:, 1:])
    assert torch.all((out.scores > 0) & (out.scores < 1))
    assert torch.allclose(out.embeddings.norm(dim=-1), torch.ones(2, 6), atol=1e-5)
    assert torch.all(out.boxes[..., 0::2] >= 0) and torch.all(out.boxes[..., 0::2] <= 96)
    assert torch.all(out.boxes[..., 1::2] >= 0) and torch.all(out.boxes[..., 1::2] <= 64)


def test_inference_keeps_duplicate_boxes_because_it_has_no_nms(make_model):
    # Identical proposals give identical detections; NMS would keep only one of them.
    model = make_model().eval()
    with torch.no_grad():
        model.proposal_features.copy_(model.proposal_features[:1].expand(6, -1))
        out = model(torch.randn(1, 3, 64, 96))
    assert out.scores.shape == (1, 6)
    assert torch.allclose(out.boxes[0], out.boxes[0, :1].expand(6, 4))


def test_inference_pairs_each_box_with_its_own_proposal_embedding(make_model):
    model = make_model().eval()
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(images)
        features = model.fpn(model.backbone(images))
        results = model._run_stages(features, torch.tensor([[64, 96]]), model.reid_stages[-1:])
    last = results[-1]
    order = last.detection.logits[0].sigmoid().argsort(descending=True)
    assert torch.allclose(out.embeddings[0], last.reid.embedding()[0, order], atol=1e-6)


def test_training_without_targets_is_an_error(make_model):
    with pytest.raises(ValueError, match="targets"):
        make_model().train()(torch.zeros(1, 3, 64, 64))


def test_malformed_targets_are_errors(make_model):
    model = make_model().train()
    images = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="1 images"):
        model(images, [])
    with pytest.raises(ValueError, match="pids"):
        model(images, [{"boxes": torch.zeros(1, 4), "pids": torch.zeros(2, dtype=torch.long)}])


def test_images_of_the_wrong_shape_are_an_error(make_model):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        make_model().eval()(torch.zeros(3, 64, 64))


def test_model_exposes_its_config_and_preprocessing(make_config):
    config = make_config()
    model = Leaps(config.model_dump())
    assert model.config == config
    assert model.preprocess == config.preprocess
    assert model.embedding_dim == config.embedding_dim == 16


def test_backbone_dcn_stages_make_those_stages_deformable(make_model):
    model = make_model(backbone={"dcn_stages": ["res4", "res5"], "dcn_modulated": True})
    deformable = [
        stage
        for stage in ("res2", "res3", "res4", "res5")
        if any(isinstance(m, DeformConvPack) for m in model.backbone.stage(stage).modules())
    ]
    assert deformable == ["res4", "res5"]


# --- ablation switches (Tables 3-7) -------------------------------------------------------


def test_plain_roi_align_ablation_drops_the_offset_predictors(make_model):
    assert all(head.offset_predictor is not None for head in make_model().reid_heads)
    plain = make_model(reid={"roi_align": "plain"})
    assert all(head.offset_predictor is None for head in plain.reid_heads)


@pytest.mark.parametrize(
    ("branches", "kinds", "embedding_dim"),
    [
        (["prm"], [PlainReidModule], 8),
        (["hirm"], [HierarchicalInteractionReidModule], 8),
        (["prm", "prm"], [PlainReidModule, PlainReidModule], 16),
    ],
)
def test_branch_ablations_change_the_modules_and_the_embedding(
    make_model, batch, branches, kinds, embedding_dim
):
    model = make_model(
        reid={"branches": branches}, reid_loss={"diversity": len(branches) == 2, **PER_HEAD}
    )
    assert [type(b) for b in model.reid_heads[0].branches] == kinds
    assert model.embedding_dim == embedding_dim
    with torch.no_grad():
        assert model.eval()(batch[0]).embeddings.shape[-1] == embedding_dim
    losses = _losses(model, batch)
    if branches == ["prm", "prm"]:
        assert {"loss_oim_prm1_s3", "loss_oim_prm2_s3", "loss_div_s3"} <= set(losses)
    else:
        assert f"loss_oim_{branches[0]}_s3" in losses and "loss_div_s3" not in losses


def test_hirm_interaction_ablations_change_the_modules(make_model):
    no_intra = make_model(reid={"intra_instance": False}).reid_heads[0].branches[1]
    no_inter = make_model(reid={"inter_instance": False}).reid_heads[0].branches[1]
    assert type(no_intra.intra_instance).__name__ == "_FlattenProjection"
    assert no_inter.inter_instance is None


def test_diversity_loss_switch(make_model, batch):
    losses = _losses(make_model(reid_loss={"diversity": False}), batch)
    assert not any(name.startswith("loss_div") for name in losses)


def _with_proposals_around_the_labeled_person(model: Leaps) -> Leaps:
    """Proposals that stay put (zero deltas): 0 on the labeled person of the batch, 1 and 2
    shifted by 1 and 2 pixels (IoU ~0.9 and ~0.8: DRSM samples), the rest far from everyone.
    Random lookup tables make the per-sample OIM losses differ."""
    person = torch.tensor([8.0, 4.0, 30.0, 60.0])
    far = torch.tensor([60.0, 0.0, 70.0, 8.0])
    shift = torch.tensor([1.0, 0.0, 1.0, 0.0])
    boxes = torch.stack([person, person + shift, person + 2 * shift, far, far, far])
    scale = torch.tensor([96.0, 64.0, 96.0, 64.0])
    with torch.no_grad():
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        model.proposal_boxes.copy_(torch.stack([cx, cy, w, h], 1) / scale)
        for stage in model.stages:
            stage.box_deltas.weight.zero_()
            stage.box_deltas.bias.zero_()
        generator = torch.Generator().manual_seed(0)
        for memory in model.reid_criterion.memories.values():
            lut = torch.randn(memory.lut.shape, generator=generator)
            memory.lut.copy_(torch.nn.functional.normalize(lut, dim=1))
    return model


def test_drsm_switches_change_the_re_id_loss(make_model, batch):
    # Same weights and data: only the re-id samples (or their weights) differ.
    losses = [
        _losses(_with_proposals_around_the_labeled_person(make_model(**sections)), batch)
        for sections in (
            {},
            {"reid_loss": {"drsm": False}},
            {"reid_loss": {"drsm_weighting": False}},
        )
    ]
    full, without_drsm, unweighted = (loss["loss_oim"].item() for loss in losses)
    assert len({full, without_drsm, unweighted}) == 3


def test_stage_and_proposal_counts_and_re_id_stages_follow_the_config(make_model, batch):
    model = make_model(
        detection={"num_stages": 4, "num_proposals": 9}, reid={"stages": 3}, reid_loss=PER_HEAD
    )
    assert len(model.stages) == 4 and len(model.reid_heads) == 3
    losses = _losses(model, batch)
    assert "loss_cls_s4" in losses
    assert {stage for stage in (1, 2, 3, 4) if f"loss_oim_prm_s{stage}" in losses} == {2, 3, 4}
    with torch.no_grad():
        assert model.eval()(batch[0]).scores.shape == (2, 9)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"reid": {"branches": ["prm"]}}, "diversity"),
        ({"reid": {"stages": 4}}, "num_stages"),
        ({"fpn": {"channels": 32}}, "hidden_dim"),
        ({"fpn": {"in_stages": ["res4", "res5"]}}, "res3"),
        ({"detection": {"num_heads": 3}}, "divisible"),
    ],
)
def test_inconsistent_configs_are_rejected_with_the_reason(make_config, sections, message):
    with pytest.raises(ValidationError, match=message):
        make_config(**sections)


def test_unknown_config_keys_are_errors():
    with pytest.raises(ValidationError, match="num_querys"):
        LeapsConfig.model_validate({"detection": {"num_querys": 10}})


def test_inference_exports_with_dynamic_batch_image_size_and_image_sizes(make_model):
    # No Python control flow on tensor values and no specialised sizes in the inference path.
    # (One stage: tracing time grows with every stage, and all stages are alike.)
    model = make_model(detection={"num_stages": 1}, reid={"stages": 1}).eval()
    batch, height, width = (torch.export.Dim(n, min=1, max=8) for n in ("batch", "h", "w"))
    exported = torch.export.export(
        model,
        (torch.randn(2, 3, 64, 96),),
        {"image_sizes": torch.tensor([[64.0, 96.0], [50.0, 70.0]])},
        dynamic_shapes={
            "images": {0: batch, 2: 32 * height, 3: 32 * width},
            "image_sizes": {0: batch},
        },
    )
    images = torch.randn(3, 3, 96, 128)
    image_sizes = torch.tensor([[96.0, 128.0], [40.0, 100.0], [90.0, 33.0]])
    with torch.no_grad():
        expected = model(images, image_sizes=image_sizes)
        actual = exported.module()(images, image_sizes=image_sizes)
    for name, value in expected._asdict().items():
        # The exported graph decomposes some ops: pixel coordinates agree to float precision.
        assert torch.allclose(getattr(actual, name), value, rtol=1e-4, atol=1e-4), name


def test_training_and_inference_run_under_autocast(make_model, batch):
    # Mixed precision (the trainer's CUDA float16; bfloat16 is CPU's): RoIs stay float32.
    model = make_model()
    images, targets = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.train()(images, targets)
        with torch.no_grad():
            detections = model.eval()(images)
    assert all(torch.isfinite(value) for value in losses.values())
    assert detections.scores.shape == (2, 6)


def test_the_detection_stages_pool_from_the_configured_pyramid_level(make_model, batch):
    paper, small_persons = make_model(), make_model(detection={"feature_level": "p3"})
    assert {stage.stride for stage in paper.stages} == {16}  # F_s16, Fig. 3
    assert {stage.stride for stage in small_persons.stages} == {8}
    assert all(torch.isfinite(v) for v in _losses(small_persons, batch).values())
