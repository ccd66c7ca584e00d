"""AlignPS: configs build, the re-id loss sees the positive locations, fixed-size outputs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.alignps import AlignPS, AlignPSConfig, image_mean
from models.heads.fcos import FCOSOutputs
from models.ops.deform_conv import DeformConvPack
from models.types import Detections
from training.config import load_config

SUBTRACT = "model.subtract_image_mean"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = CONFIGS / "tiny" / "alignps_synthetic.yaml"
PAPER_CONFIGS = [
    "alignps_r50_cuhk.yaml",
    "alignps_r50_prw.yaml",
    "alignps_plus_r50_cuhk.yaml",
    "alignps_plus_r50_prw.yaml",
]


def _model(path: Path = TINY, *overrides: str) -> AlignPS:
    torch.manual_seed(0)
    return AlignPS(AlignPSConfig.model_validate(load_config(path, overrides).model))


@pytest.fixture(scope="module")
def tiny() -> AlignPS:
    return _model()


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
    assert tiny.config.name == "alignps"
    assert tiny.preprocess is tiny.config.preprocess
    assert tiny.embedding_dim == tiny.config.afa.channels == 64
    assert tiny.strides == [8]


def test_shapes_through_every_module(tiny):
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        stages = tiny.backbone(images)
        embedding_map = tiny.afa(stages)
        outputs = tiny.head([embedding_map])
    assert list(stages) == ["res3", "res4", "res5"]
    assert embedding_map.shape == (2, 64, 12, 16)
    assert isinstance(outputs, FCOSOutputs)
    assert [t.shape for t in outputs.cls_logits] == [(2, 1, 12, 16)]
    assert [t.shape for t in outputs.ltrb] == [(2, 4, 12, 16)]
    assert [t.shape for t in outputs.quality] == [(2, 1, 12, 16)]


def test_training_forward_returns_named_finite_losses_that_reach_every_module():
    model = _model().train()
    losses = model(torch.randn(2, 3, 128, 128), _targets())
    # The tiny config follows the released PRW head: OIM without the triplet term.
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality", "loss_oim"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for module in ("backbone", "afa", "head"):
        grads = [p.grad for p in getattr(model, module).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), module
        assert sum(g.abs().sum() for g in grads) > 0, module


def test_reid_loss_sees_exactly_the_positive_locations_features():
    # 128 x 128 images: a 16 x 16 stride-8 map whose locations sit at 4 + 8 k pixels.
    # Center sampling (radius 1.5 strides = 12 px) keeps the locations strictly inside the box's
    # centre square:
    # - image 0, labeled pid 3, box centre (64, 64): x and y in (52, 76) -> 60, 68, i.e. rows
    #   and columns 7 and 8;
    # - image 1, unlabeled, box (0, 0, 32, 48), centre (16, 24): x in (4, 28) -> 12, 20
    #   (columns 1, 2), y in (12, 36) -> 20, 28 (rows 2, 3);
    # - image 2 has nobody.
    model = _model(TINY, f"{SUBTRACT}=false").train()
    targets = [
        {"boxes": torch.tensor([[40.0, 20.0, 88.0, 108.0]]), "pids": torch.tensor([3])},
        {"boxes": torch.tensor([[0.0, 0.0, 32.0, 48.0]]), "pids": torch.tensor([-1])},
        {"boxes": torch.zeros(0, 4), "pids": torch.zeros(0, dtype=torch.long)},
    ]
    seen = {}
    model.afa.register_forward_hook(lambda module, args, out: seen.update(map=out.detach()))
    model.reid_loss.register_forward_pre_hook(
        lambda module, args: seen.update(features=args[0].detach(), pids=args[1])
    )
    model(torch.randn(3, 3, 128, 128), targets)

    positives = [(0, 7, 7), (0, 7, 8), (0, 8, 7), (0, 8, 8)]
    positives += [(1, 2, 1), (1, 2, 2), (1, 3, 1), (1, 3, 2)]
    expected = torch.stack([seen["map"][b, :, row, col] for b, row, col in positives])
    torch.testing.assert_close(seen["features"], F.normalize(expected, dim=1))
    assert seen["pids"].tolist() == [3] * 4 + [-1] * 4
    # The unlabeled person's features entered the circular queue (and nothing else did).
    torch.testing.assert_close(model.reid_loss.queue[:4], seen["features"][4:])
    assert int(model.reid_loss.queue_ptr) == 4


def test_inference_gives_fixed_size_sorted_detections_with_unit_embeddings():
    # No score threshold, so that the untrained model's low scores fill the slots, and a
    # 4 x 8 map: at most 32 of the K = 50 slots can be used.
    model = _model(TINY, "model.inference.score_thresh=0.0").eval()
    with torch.no_grad():
        detections = model(torch.randn(2, 3, 32, 64))
    assert isinstance(detections, Detections)
    k = model.config.inference.max_detections
    assert detections.boxes.shape == (2, k, 4)
    assert detections.scores.shape == (2, k)
    assert detections.embeddings.shape == (2, k, 64)
    scores = detections.scores
    assert (scores[:, :-1] >= scores[:, 1:]).all() and (scores >= 0).all()
    used = scores > 0
    assert used.any() and (~used).any()
    norms = detections.embeddings.norm(dim=-1)
    torch.testing.assert_close(norms[used], torch.ones_like(norms[used]))
    assert (detections.embeddings[~used] == 0).all() and (detections.boxes[~used] == 0).all()


def test_an_image_is_detected_only_inside_its_own_size_in_a_padded_batch():
    """Image 0 fills the top-left 32 x 48 of a 64 x 96 batch, image 1 all of it: image 0's boxes
    stay inside its size, and only its 4 x 6 stride-8 locations detect anything."""
    model = _model(TINY, "model.inference.score_thresh=0.0").eval()
    image_sizes = torch.tensor([[32, 48], [64, 96]])
    with torch.no_grad():
        detections = model(torch.randn(2, 3, 64, 96), image_sizes=image_sizes)
    used = detections.scores > 0
    assert 0 < used[0].sum() <= 4 * 6 < used[1].sum()
    x, y = detections.boxes[..., 0::2], detections.boxes[..., 1::2]
    assert (x[0] <= 48).all() and (y[0] <= 32).all()
    assert (x[1] > 48).any() and (y[1] > 32).any()


def test_each_detection_embeds_the_afa_feature_at_its_location():
    model = _model(TINY, "model.inference.score_thresh=0.0", f"{SUBTRACT}=false").eval()
    images = torch.randn(1, 3, 64, 96)  # an 8 x 12 stride-8 map
    with torch.no_grad():
        detections = model(images)
        embedding_map = model.afa(model.backbone(images))
        outputs = model.head([embedding_map])
        _, scores, locations = model.head.predict(
            outputs, [8], torch.tensor([[64, 96]]), model.config.inference
        )
    torch.testing.assert_close(detections.scores, scores)
    for slot in range(int((scores[0] > 0).sum())):
        row, col = divmod(int(locations[0, slot]), 12)  # row-major flattening
        expected = F.normalize(embedding_map[0, :, row, col], dim=0)
        torch.testing.assert_close(detections.embeddings[0, slot], expected)


def test_subtracting_the_image_mean_makes_outputs_blind_to_what_all_locations_share():
    # A vector added to every location of the AFA output (a camera's colour cast, say) changes
    # nothing downstream when the image's mean feature is subtracted, and changes things
    # when it is not.
    images = torch.randn(1, 3, 64, 96)
    for subtract in (True, False):
        model = _model(TINY, "model.inference.score_thresh=0.0", f"{SUBTRACT}={subtract}").eval()
        shift = torch.randn(1, 64, 1, 1)
        with torch.no_grad():
            plain = model(images)
            hook = model.afa.register_forward_hook(
                lambda module, args, out, shift=shift: out + shift
            )
            shifted = model(images)
            hook.remove()
        same = torch.allclose(plain.embeddings, shifted.embeddings, atol=1e-5)
        assert same == subtract


def test_the_image_mean_leaves_out_the_padding_of_a_batch():
    # A 2 x 3 map at stride 8 (a 16 x 24 batch); image 1 is 16 x 12: its valid locations are
    # those with centre x = 4 < 12 and 12 < 12 is not, so only column 0.
    embedding_map = torch.arange(12.0).view(2, 1, 2, 3)
    sizes = torch.tensor([[16, 24], [16, 12]])
    means = image_mean(embedding_map, sizes, stride=8)
    assert means.shape == (2, 1, 1, 1)
    assert means.flatten().tolist() == [2.5, (6.0 + 9.0) / 2]


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_builds_and_runs_at_reduced_size(name):
    model = _model(CONFIGS / name)
    cfg = model.config
    assert (cfg.preprocess.min_size, cfg.preprocess.max_size) == (900, 1500)
    assert cfg.inference.nms_thresh == 0.5
    assert (cfg.reid_loss.num_labeled, cfg.reid_loss.queue_size) == (
        (5532, 5000) if "cuhk" in name else (483, 500)
    )
    images = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        losses = model.train()(images, _targets())
        detections = model.eval()(images)
    assert all(torch.isfinite(v) for v in losses.values())
    assert detections.embeddings.shape == (2, 100, 256)
    # AlignPS+ differs from AlignPS by deformable 3x3 convs in res3-res5 (Table 5).
    expected = ["res3", "res4", "res5"] if "plus" in name else []
    assert _deformable_stages(model) == expected


# The released heads behind the published numbers (github.com/daodaofr/AlignPS):
# FCOSReidHeadFocalOimSub for PRW, FCOSReidHeadFocalSubTriQueue for CUHK-SYSU.
RELEASED_REID = {
    "prw": dict(
        lut_scale=15.0,
        queue_scale=10.0,
        lut_renormalize=True,
        queue_dims=64,
        average_over="all",
        focal_gamma=2.0,
        triplet_weight=0.0,
    ),
    "cuhk": dict(
        lut_scale=10.0,
        queue_scale=10.0,
        lut_renormalize=False,
        queue_dims=64,
        average_over="all",
        focal_gamma=2.0,
        triplet_weight=1.0,
        triplet_mining="hardest",
    ),
}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_carry_the_released_heads_settings(name):
    cfg = AlignPSConfig.model_validate(load_config(CONFIGS / name, []).model)
    assert cfg.subtract_image_mean
    head = cfg.head
    assert head.dcn_on_last_conv and head.box_loss == "giou"
    assert (head.box_loss_weights, head.box_loss_normalizer) == ("centerness", "weights")
    released = RELEASED_REID["cuhk" if "cuhk" in name else "prw"]
    assert {key: getattr(cfg.reid_loss, key) for key in released} == released


def test_defaults_are_the_released_cuhk_sysu_head():
    cfg = AlignPSConfig()
    assert cfg.subtract_image_mean and cfg.head.dcn_on_last_conv
    assert {key: getattr(cfg.reid_loss, key) for key in RELEASED_REID["cuhk"]} == (
        RELEASED_REID["cuhk"]
    )


def test_a_partial_head_section_keeps_alignps_defaults_for_the_rest():
    cfg = AlignPSConfig.model_validate(
        {"head": {"feat_channels": 128}, "inference": {"max_detections": 20}}
    )
    assert cfg.head.feat_channels == 128
    assert cfg.head.num_levels == 1 and cfg.head.dcn_on_last_conv
    assert cfg.head.box_loss_weights == "centerness" and cfg.head.assigner.size_ranges == ()
    assert cfg.inference.max_detections == 20 and cfg.inference.nms_thresh == 0.5


def test_a_queue_wider_than_the_embedding_is_a_config_error():
    with pytest.raises(ValueError, match="queue_dims"):
        AlignPSConfig.model_validate(
            {"afa": {"channels": 32}, "head": {"in_channels": 32, "gn_groups": 8}}
        )


def _deformable_stages(model: AlignPS) -> list[str]:
    return [
        stage
        for stage in ("res2", "res3", "res4", "res5")
        if any(isinstance(m, DeformConvPack) for m in model.backbone.stage(stage).modules())
    ]


def test_a_few_steps_on_one_batch_lower_the_loss():
    model = _model().train()
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


def test_head_must_read_the_single_afa_output():
    with pytest.raises(ValueError, match="in_channels"):
        AlignPSConfig.model_validate({"afa": {"channels": 64}})
    with pytest.raises(ValueError, match="num_levels"):
        AlignPSConfig.model_validate(
            {"head": {"num_levels": 2, "assigner": {"name": "center_sampling"}}}
        )


def test_targets_without_pids_are_an_error(tiny):
    with pytest.raises(ValueError, match="pids"):
        tiny.train()(torch.randn(1, 3, 64, 64), [{"boxes": torch.tensor([[8.0, 8, 40, 60]])}])
