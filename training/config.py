"""The training configuration: one YAML file per model x dataset, validated by pydantic.

Every field has a default and a description; unknown keys are errors that name the key and
suggest the closest valid one. ``--set a.b=value`` overrides are parsed as YAML values and
applied to the raw YAML data before validation, so they obey the same rules as the file.

The ``model`` section is a free-form dict here: the model's own config class validates it when
the model is built, with the same strictness.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from common.config_files import ConfigFileError, apply_overrides, read_yaml_mapping
from models.config import StrictModel


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message is one line meant for a user."""


class MultiScaleConfig(StrictModel):
    """Random rescaling of training images (keeps the aspect ratio).

    A target (short, long) pair is drawn and the image is scaled by
    ``min(short / short_side_of_image, long / long_side_of_image)``, as ``models.preprocess``
    does at test time.
    """

    mode: Literal["fixed", "range", "choice"] = Field(
        "fixed",
        description=(
            "fixed: the model's own preprocessing sizes (no multi-scale); "
            "range: short and long drawn uniformly from [lo, hi] each (AlignPS / mmdetection "
            "'range' mode: short 400-1200, long 667-2000); "
            "choice: short drawn from a list, long from a list (Sparse R-CNN / LEAPS style: "
            "short 480..800 step 32, long 1333)."
        ),
    )
    short_side: list[int] = Field(
        default_factory=list,
        description="range: [lo, hi] of the short side; choice: candidate short sides; fixed: [].",
    )
    long_side: list[int] = Field(
        default_factory=list,
        description="range: [lo, hi] of the long side; choice: candidate caps; fixed: [].",
    )

    @model_validator(mode="after")
    def _check_sides(self) -> MultiScaleConfig:
        sides = {"short_side": self.short_side, "long_side": self.long_side}
        for name, values in sides.items():
            if any(v <= 0 for v in values):
                raise ValueError(f"{name} values must be positive, got {values}")
            if self.mode == "fixed" and values:
                raise ValueError(f"mode 'fixed' uses the model's sizes; {name} must be empty")
            if self.mode == "range" and (len(values) != 2 or values[0] > values[1]):
                raise ValueError(f"mode 'range' needs {name} = [lo, hi] with lo <= hi")
            if self.mode == "choice" and not values:
                raise ValueError(f"mode 'choice' needs at least one {name} value")
        return self


class DataConfig(StrictModel):
    """Where the data lives and how training batches are made."""

    dataset: str = Field(
        "prw", description="Dataset name for training.datasets.load_dataset (prw, cuhk_sysu, ...)."
    )
    root: Path = Field(Path("data/prw"), description="The dataset folder, as distributed.")
    train_split: str = Field("train", description="Split used for training.")
    test_split: str = Field("test", description="Split used for evaluation.")
    batch_size: int = Field(2, gt=0, description="Images per batch, per process.")
    workers: int = Field(2, ge=0, description="DataLoader worker processes per process.")
    multiscale: MultiScaleConfig = Field(
        default_factory=MultiScaleConfig, description="Random rescaling of training images."
    )
    flip_prob: float = Field(
        0.5, ge=0, le=1, description="Probability of a horizontal flip of a training image."
    )
    group_by_aspect_ratio: bool = Field(
        False,
        description="Batch landscape and portrait images separately (less padding); reads every "
        "image header once at start-up.",
    )


class ParamGroupRule(StrictModel):
    """Learning rate and weight decay multipliers for the parameters whose qualified names match
    a pattern (``fnmatch``: ``*`` matches any run of characters, dots included)."""

    pattern: str = Field(
        ...,
        min_length=1,
        description="fnmatch pattern over parameter names, e.g. '*.offset_predictor.*'.",
    )
    lr_mult: float = Field(1.0, ge=0, description="Multiplier of the learning rate.")
    decay_mult: float = Field(1.0, ge=0, description="Multiplier of the weight decay.")


class OptimConfig(StrictModel):
    """The optimizer and its parameter groups.

    Each parameter's learning rate and weight decay are the base values times multipliers, as
    mmdetection's ``paramwise_cfg`` sets them: the first of ``param_groups`` whose pattern
    matches the parameter's name decides; without a match, normalisation layers' weights and
    biases take ``norm_decay_mult`` and the biases of other layers ``bias_lr_mult`` and
    ``bias_decay_mult``.
    """

    name: Literal["sgd", "adamw"] = Field("sgd", description="sgd (with momentum) or adamw.")
    lr: float = Field(
        0.001,
        gt=0,
        description="Base learning rate (after warmup), for `reference_batch_size` images per "
        "step when that is set.",
    )
    reference_batch_size: int | None = Field(
        None,
        gt=0,
        description="Images per step that `lr` is meant for: the learning rate is scaled by "
        "(data.batch_size x processes) / reference_batch_size (the linear scaling rule, Goyal "
        "et al. 2017); null = `lr` as it is, whatever the batch.",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (sgd only).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (adamw only).")
    weight_decay: float = Field(0.0005, ge=0, description="Weight decay (decoupled for adamw).")
    clip_grad_norm: float | None = Field(
        None, gt=0, description="Clip the global gradient L2 norm to this value; null = off."
    )
    bias_lr_mult: float = Field(
        1.0, ge=0, description="Learning rate multiplier of biases outside normalisation layers."
    )
    bias_decay_mult: float = Field(
        1.0, ge=0, description="Weight decay multiplier of biases outside normalisation layers."
    )
    norm_decay_mult: float = Field(
        1.0, ge=0, description="Weight decay multiplier of normalisation layers' parameters."
    )
    param_groups: list[ParamGroupRule] = Field(
        default_factory=list,
        description="Rules by parameter name, checked in order; each must match some parameter.",
    )


class ScheduleConfig(StrictModel):
    """Epochs, linear warmup, then step decay."""

    epochs: int = Field(24, gt=0, description="Number of training epochs.")
    warmup_iters: int = Field(300, ge=0, description="Iterations of linear warmup; 0 = off.")
    warmup_factor: float = Field(
        0.001, gt=0, le=1, description="Learning rate factor at iteration 0 of the warmup."
    )
    milestones: list[int] = Field(
        default_factory=lambda: [16, 22],
        description="Epochs after which the learning rate is multiplied by gamma.",
    )
    gamma: float = Field(0.1, gt=0, description="Decay factor at each milestone.")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget for the training iterations (evaluation not counted); "
        "None = no budget. The trainer times its first iterations and plans the iterations "
        "that fit, at most `epochs` worth (the last epoch may be partial), with the warmup and "
        "the milestones at the same fractions of the shorter run; it plans again as the pace "
        "changes and stops when the budget is spent.",
    )

    @model_validator(mode="after")
    def _check_milestones(self) -> ScheduleConfig:
        if sorted(self.milestones) != self.milestones or any(m <= 0 for m in self.milestones):
            raise ValueError(f"milestones must be positive and ascending, got {self.milestones}")
        return self


class EvalConfig(StrictModel):
    """Evaluation on the test split (see docs/evaluation.md)."""

    every: int = Field(0, ge=0, description="Evaluate every N epochs; 0 = only at the end.")
    at_end: bool = Field(True, description="Evaluate once training has finished.")
    det_thresh: float = Field(
        0.5, ge=0, le=1, description="Gallery detections below this score are dropped."
    )
    query_mode: Literal["max_iou", "gt_box"] = Field(
        "max_iou",
        description="gt_box: embed the query box (needs a model with embed_boxes); max_iou: the "
        "embedding of the detection on the query image that overlaps the query box most.",
    )
    gallery_size: int = Field(
        100, description="CUHK-SYSU gallery size (50..4000, -1 = full test pool); PRW ignores it."
    )
    cbgm: bool = Field(False, description="Re-score with context bipartite graph matching.")
    batch_size: int = Field(1, gt=0, description="Images per inference batch.")


class InitConfig(StrictModel):
    """Weights that start a run (all of the model, or some of its modules), as a fine-tuning
    or a later training phase starts from an earlier run."""

    weights: Path = Field(
        ..., description="A run folder (its model.safetensors) or a .safetensors weights file."
    )
    modules: list[str] = Field(
        default_factory=list,
        description="Module names (prefixes of parameter names, e.g. 'backbone') whose weights "
        "are loaded; every parameter and buffer under them must be in the file. Empty = the "
        "whole model.",
    )


class PhaseConfig(StrictModel):
    """One phase of a run trained in several (e.g. a detector, then a re-id network beside the
    frozen detector): the base config with this phase's sections merged in, in its own folder
    ``RUN_DIR/<name>``; a phase starts when the one before it has finished."""

    name: str = Field(
        ..., pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Folder name of the phase's run."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Sections merged into the base config for this phase (nested mappings are "
        "merged key by key, other values replace), e.g. {model: {phase: reid}, optim: {lr: 0.1}}.",
    )
    init_from: str | None = Field(
        None, description="An earlier phase whose final weights start this one."
    )
    init_modules: list[str] = Field(
        default_factory=list,
        description="With init_from: the module names loaded from it; empty = the whole model.",
    )
    freeze: list[str] = Field(
        default_factory=list, description="Module names frozen in this phase (see `freeze`)."
    )
    budget_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="This phase's share of schedule.max_minutes; phases without one share the "
        "rest equally.",
    )


class TrainConfig(StrictModel):
    """Everything a training run needs; saved resolved as config.yaml in the run folder."""

    model: dict[str, Any] = Field(
        default_factory=dict, description="The model's config; validated by the model's builder."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Data and batching.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="Learning rate schedule."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    amp: bool = Field(True, description="Mixed precision on CUDA (float16 + GradScaler).")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when available; under torchrun, cuda:LOCAL_RANK."
    )
    seed: int = Field(0, description="Seed of every random number generator.")
    output_dir: Path = Field(Path("runs/default"), description="The run folder.")
    log_every: int = Field(20, gt=0, description="Log losses every N iterations.")
    checkpoint_every: int = Field(1, gt=0, description="Save a checkpoint every N epochs.")
    tensorboard: bool = Field(True, description="Write TensorBoard scalars to the run folder.")
    find_unused_parameters: bool = Field(
        False, description="DDP: allow parameters that get no gradient in some iterations."
    )
    init: InitConfig | None = Field(
        None, description="Weights that start the run (not used when resuming); null = none."
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Module names (prefixes of parameter names) that do not train: their "
        "parameters get no gradient and their layers stay in eval mode (norm statistics kept).",
    )
    phases: list[PhaseConfig] = Field(
        default_factory=list,
        description="Train in these phases, one after the other, from one command; empty = one "
        "run of this config.",
    )

    @model_validator(mode="after")
    def _check_phases(self) -> TrainConfig:
        names = [phase.name for phase in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phases: names must be unique, got {names}")
        for index, phase in enumerate(self.phases):
            if phase.init_from is not None and phase.init_from not in names[:index]:
                raise ValueError(
                    f"phases: {phase.name!r} starts from {phase.init_from!r}, which is not an "
                    f"earlier phase (earlier: {names[:index]})"
                )
            if "phases" in phase.overrides:
                raise ValueError(f"phases: {phase.name!r} cannot override the phases")
        shares = [phase.budget_share for phase in self.phases if phase.budget_share is not None]
        if sum(shares) > 1 + 1e-9:
            raise ValueError(f"phases: budget shares add up to more than 1: {shares}")
        return self


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or the defaults when path is None) and apply ``key=value`` overrides."""
    source = str(path) if path is not None else "config"
    try:
        data = read_yaml_mapping(path, "config file") if path is not None else {}
        apply_overrides(data, overrides)
    except ConfigFileError as error:
        raise ConfigError(str(error)) from None
    return validate_config(data, source)


def validate_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """A TrainConfig from raw data; validation errors become one-line ConfigErrors."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc, TrainConfig)}") from None


def describe_validation_error(
    error: ValidationError, schema: type[BaseModel] | None, prefix: str = ""
) -> str:
    """One line per pydantic error, joined with '; '. Unknown keys get a close-match suggestion
    when `schema` (the validated class) is given; `prefix` is the section the data came from
    (``model`` for a model's config), prepended to every key."""
    messages = []
    for item in error.errors():
        key = ".".join([prefix] * bool(prefix) + [str(part) for part in item["loc"]]) or "<root>"
        if item["type"] == "extra_forbidden":
            message = f"unknown key '{key}'"
            suggestion = _closest_field(schema, item["loc"]) if schema else None
            if suggestion:
                message += f" (did you mean '{suggestion}'?)"
        else:
            message = f"{key}: {item['msg']}"
        messages.append(message)
    return "; ".join(messages)


def _closest_field(schema: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """The dotted name of the valid key closest to the unknown key at `loc`, if one is close."""
    model: Any = schema
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    matches = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return ".".join([*map(str, loc[:-1]), matches[0]]) if matches else None


def dump_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
