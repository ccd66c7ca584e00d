"""The training loop shared by every model family.

One process trains on CPU or one GPU; ``torchrun --nproc_per_node N -m training ...`` trains
with DistributedDataParallel (NCCL on GPUs, Gloo on CPU). Rank 0 alone logs, writes TensorBoard
scalars and checkpoints; every rank takes part in evaluation (each embeds a share of the
images).

Per iteration: forward under autocast (CUDA with ``amp``), a sum of the model's named losses,
backward through a GradScaler, optional gradient clipping, an optimizer step and a per-iteration
learning rate: linear warmup, then step decay at milestones. Parameter groups take their own
learning rate and weight decay multipliers (``optim``: by name pattern, biases, norm layers).

The schedule in force is an :class:`IterationPlan`: a length, a warmup and milestones, in
iterations. Without a time budget it is the config's epochs. With one (``schedule.max_minutes``)
the trainer times its first iterations and plans the iterations that fit, at most the config's,
with the warmup and the milestones at the same fractions of the shorter run, so the learning rate
still warms up and decays within it on a slow machine; the last epoch may be partial. It plans
again every few percent of the run as the pace changes, and stops when the budget is spent,
whatever the plan said (a machine that got busier). The plan and the time spent are part of the
checkpoint, so a resumed run keeps them.

SIGINT and SIGTERM end the current iteration, save a checkpoint and raise TrainingInterrupted;
``--resume`` continues from it with the same weights, optimizer, schedule, data order and
random streams, so an interrupted run ends where an uninterrupted one would have.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import MethodType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch import Tensor, nn
from tqdm import tqdm

from common.run_folder import (
    RUN_METRICS_FILE,
    RUN_PREDICTIONS_FILE,
    RUN_TENSORBOARD_DIR,
    RUN_WEIGHTS_FILE,
)
from models import UnknownModelError
from models.preprocess import PreprocessConfig
from training.checkpoint import (
    load_module_weights,
    load_state,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from training.config import (
    ConfigError,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    describe_validation_error,
)
from training.data import TrainLoader, load_split
from training.datasets import PersonSearchSplit
from training.inference import evaluate_model, load_test_split, require_box_embedding

logger = logging.getLogger(__name__)

ModelBuilder = Callable[[dict[str, Any]], nn.Module]
PACE_ITERATIONS = 10  # timed iterations, after a first warm-up one, that plan a budgeted schedule
# Layers whose parameters take optim.norm_decay_mult.
NORM_LAYERS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
REPLANS = 20  # a budgeted run plans again every 1/REPLANS of its planned length


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint in `run_dir`."""

    def __init__(self, signum: int, run_dir: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved in {run_dir}")
        self.signum = signum
        self.run_dir = run_dir


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands in a (possibly single-process) distributed run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_process_group(use_cuda: bool) -> ProcessGroup:
    """Join the process group torchrun describes in the environment (or stay alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ProcessGroup()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]))


def select_device(config: TrainConfig, group: ProcessGroup) -> torch.device:
    """CPU, or the CUDA device of this process (cuda:LOCAL_RANK under torchrun)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but CUDA is not available")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(group.local_rank)
    return torch.device("cuda", group.local_rank)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model_checked(builder: ModelBuilder, model_config: dict[str, Any]) -> nn.Module:
    """Build the model, turning the model config's validation errors into a ConfigError."""
    try:
        model = builder(model_config)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, schema=None, prefix="model")) from None
    except UnknownModelError as error:
        raise ConfigError(f"model.name: {error}") from None
    if not isinstance(getattr(model, "preprocess", None), PreprocessConfig):
        raise TypeError(
            f"{type(model).__name__} has no `preprocess` PreprocessConfig, which the model "
            "contract requires (models/__init__.py)"
        )
    return model


@dataclass(frozen=True)
class IterationPlan:
    """The learning rate schedule in force, in iterations: the run's length, its linear warmup
    and the milestones after which the rate is multiplied by gamma."""

    total: int
    warmup: int
    milestones: tuple[int, ...]

    @classmethod
    def from_schedule(cls, schedule: ScheduleConfig, iters_per_epoch: int) -> IterationPlan:
        """The config's schedule as it is: its epochs and epoch milestones in iterations."""
        return cls(
            total=schedule.epochs * iters_per_epoch,
            warmup=schedule.warmup_iters,
            milestones=tuple(m * iters_per_epoch for m in schedule.milestones),
        )

    def decay_begun(self, iteration: int) -> bool:
        return bool(self.milestones) and iteration >= self.milestones[0]


def lr_factor(iteration: int, plan: IterationPlan, schedule: ScheduleConfig) -> float:
    """Learning rate multiplier at a global iteration: linear warmup from warmup_factor to 1
    over the plan's warmup, times gamma for every milestone already reached."""
    decay = schedule.gamma ** sum(iteration >= milestone for milestone in plan.milestones)
    if iteration >= plan.warmup:
        return decay
    progress = iteration / plan.warmup
    return decay * (schedule.warmup_factor + (1 - schedule.warmup_factor) * progress)


def fit_plan(
    schedule: ScheduleConfig,
    iters_per_epoch: int,
    seconds_per_iteration: float,
    iterations_done: int = 0,
    seconds_spent: float = 0.0,
) -> IterationPlan:
    """The config's schedule cut to what its time budget holds: the iterations done so far plus
    those the rest of the budget holds at the given pace (at least one, at most the config's
    epochs), with the warmup and every milestone at the same fraction of the new length (a
    milestone that would fall at or after the end is dropped)."""
    assert schedule.max_minutes is not None
    full = IterationPlan.from_schedule(schedule, iters_per_epoch)
    remaining = max(0.0, schedule.max_minutes * 60 - seconds_spent)
    fit = iterations_done + int(remaining / max(seconds_per_iteration, 1e-9))
    total = max(1, iterations_done, min(full.total, fit))
    fraction = total / full.total
    milestones = {max(1, round(m * fraction)) for m in full.milestones}
    return IterationPlan(
        total=total,
        warmup=round(full.warmup * fraction),
        milestones=tuple(sorted(m for m in milestones if m < total)),
    )


def freeze_modules(model: nn.Module, names: Sequence[str]) -> None:
    """Freeze the named modules: their parameters get no gradient (so no optimizer sees them),
    and they stay in eval mode whatever mode the model is put in, so that their norm layers
    keep their statistics and their dropout stays off."""
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ConfigError(f"freeze: the model has no modules {unknown}")
    for name in names:
        module = modules[name]
        module.requires_grad_(False)
        module.train = MethodType(_train_stays_off, module)  # type: ignore[method-assign]
        module.eval()


def _train_stays_off(module: nn.Module, mode: bool = True) -> nn.Module:
    """``train`` of a frozen module: eval mode for it and its children, whatever is asked."""
    return nn.Module.train(module, False)


def parameter_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """The trainable parameters grouped by their (learning rate, weight decay) multipliers (see
    ``OptimConfig``), the unchanged group first; each group holds ``params``, ``lr_mult`` and
    ``decay_mult``. A rule of ``optim.param_groups`` that matches nothing is a ConfigError."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {(1.0, 1.0): []}
    used = [False] * len(optim.param_groups)
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_LAYERS)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            rule = next(
                (
                    i
                    for i, r in enumerate(optim.param_groups)
                    if fnmatch.fnmatchcase(name, r.pattern)
                ),
                None,
            )
            if rule is not None:
                used[rule] = True
                mults = (optim.param_groups[rule].lr_mult, optim.param_groups[rule].decay_mult)
            elif is_norm:
                mults = (1.0, optim.norm_decay_mult)
            elif param_name == "bias":
                mults = (optim.bias_lr_mult, optim.bias_decay_mult)
            else:
                mults = (1.0, 1.0)
            groups.setdefault(mults, []).append(param)
    unused = [r.pattern for r, hit in zip(optim.param_groups, used, strict=True) if not hit]
    if unused:
        raise ConfigError(f"optim.param_groups: no trainable parameter matches {unused}")
    return [
        {"params": params, "lr_mult": lr_mult, "decay_mult": decay_mult}
        for (lr_mult, decay_mult), params in groups.items()
        if params
    ]


def base_learning_rate(optim: OptimConfig, images_per_step: int) -> float:
    """``optim.lr``, scaled linearly to the images of a step when it is given for a reference
    batch size."""
    if optim.reference_batch_size is None:
        return optim.lr
    return optim.lr * images_per_step / optim.reference_batch_size


def build_optimizer(
    model: nn.Module, config: TrainConfig, world_size: int = 1
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters, in groups with their own
    learning rate and weight decay (``parameter_groups``)."""
    optim = config.optim
    lr = base_learning_rate(optim, config.data.batch_size * world_size)
    groups = [
        {
            **group,
            "lr": lr * group["lr_mult"],
            "weight_decay": optim.weight_decay * group["decay_mult"],
        }
        for group in parameter_groups(model, optim)
    ]
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=optim.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=optim.betas)


class StopSignal:
    """Records SIGINT / SIGTERM instead of dying, so the loop can save before it exits.

    A second SIGINT while the first is pending raises KeyboardInterrupt, for a user who does
    not want to wait. Handlers are only installed from the main thread (Python's rule).
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopSignal]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Trainer:
    """Builds everything a run needs from a TrainConfig and runs it to the end.

    Args:
        config: the resolved configuration; ``output_dir`` is the run folder.
        build_model: ``config.model -> nn.Module`` satisfying the model contract (``models``).
        resume: continue the run saved in ``config.output_dir``.
    """

    def __init__(self, config: TrainConfig, build_model: ModelBuilder, resume: bool = False):
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.group = init_process_group(
            use_cuda=config.device != "cpu" and torch.cuda.is_available()
        )
        self.device = select_device(config, self.group)
        self.amp = config.amp and self.device.type == "cuda"
        resume_state = load_state(self.run_dir) if resume else None

        seed_everything(config.seed)  # the same initial weights on every rank
        split = load_split(config.data, config.data.train_split)
        self.model = build_model_checked(build_model, config.model).to(self.device)
        if config.eval.query_mode == "gt_box":  # now, not at the first evaluation hours later
            require_box_embedding(self.model)
        if resume_state is not None:
            load_weights(self.model, self.run_dir / RUN_WEIGHTS_FILE)
        elif config.init is not None:
            load_module_weights(self.model, config.init.weights, config.init.modules)
        freeze_modules(self.model, config.freeze)
        self.loader = TrainLoader(
            split,
            config.data,
            self.model.preprocess,
            config.seed,
            self.group.rank,
            self.group.world_size,
            pin_memory=self.device.type == "cuda",
        )
        self.optimizer = build_optimizer(self.model, config, self.group.world_size)
        # The schedule in force: the config's, or the part of it that fits the time budget.
        self.plan = IterationPlan.from_schedule(config.schedule, len(self.loader))
        self.planned = config.schedule.max_minutes is None  # nothing to plan without a budget
        self._next_plan = 0  # the iteration at which a budgeted run plans again
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(it, self.plan, config.schedule)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        if self.group.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )

        self.epoch, self.batch, self.iteration = 0, 0, 0
        self.train_seconds = 0.0  # spent in training iterations, across resumes
        self.stopped_by = "schedule"  # or "time budget"
        self.history: list[dict[str, float]] = []  # rank 0: mean losses per logging window
        self._warm: tuple[int, float] | None = None  # (iteration, seconds) after this process's
        # first iteration, which is slower (lazy imports, allocations): the pace is timed from it
        self.clock: Callable[[], float] = time.perf_counter  # what the budget is measured with
        seed_everything(config.seed + self.group.rank)  # distinct random streams per rank
        if resume_state is not None:
            self._restore(resume_state)
        self.writer = self._tensorboard() if self.group.is_main else None
        self.test_split: PersonSearchSplit | None = None

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> dict[str, float]:
        """Train the rest of the planned iterations (or until the time budget is spent); returns
        the final evaluation's metrics (or {})."""
        metrics: dict[str, float] = {}
        self.model.train()
        try:
            with StopSignal().installed() as stop:
                while self.iteration < self.plan.total:
                    if not self._train_epoch(stop):
                        self.save()
                        if self.stopped_by == "time budget":
                            logger.info(
                                "time budget of %g min spent after %d iterations",
                                self.config.schedule.max_minutes,
                                self.iteration,
                            )
                        break
                    self.epoch, self.batch = self.epoch + 1, 0
                    last = self.iteration >= self.plan.total
                    if self.epoch % self.config.checkpoint_every == 0 or last:
                        self.save()
                    every = self.config.eval.every
                    if every and self.epoch % every == 0 and not last:
                        metrics = self.evaluate()
                if self.config.eval.at_end:
                    metrics = self.evaluate()
        finally:
            if self.writer is not None:
                self.writer.close()
        return metrics

    def _train_epoch(self, stop: StopSignal) -> bool:
        """Train the rest of the current epoch; False if the run ended inside it (the plan's
        last iteration, or the time budget: ``stopped_by`` says which)."""
        epochs = -(-self.plan.total // len(self.loader))
        progress = tqdm(
            total=len(self.loader),
            initial=self.batch,
            desc=f"epoch {self.epoch + 1}/{epochs}",
            disable=not self.group.is_main,
            dynamic_ncols=True,
        )
        window: dict[str, list[Tensor]] = {}
        last_mark = self.clock()
        for images, image_sizes, targets in self.loader.epoch(self.epoch, self.batch):
            losses, stop_now, out_of_time = self._step(images, image_sizes, targets, stop)
            self.batch += 1
            self.iteration += 1
            now = self.clock()
            self.train_seconds += now - last_mark
            last_mark = now
            progress.update()
            for name, value in losses.items():
                window.setdefault(name, []).append(value)
            if self.iteration % self.config.log_every == 0:
                self._log(window, progress)
                window = {}
            if stop_now:
                self.save()
                progress.close()
                raise TrainingInterrupted(stop_now, self.run_dir)
            if out_of_time:
                self.stopped_by = "time budget"
                progress.close()
                return False
            self._warm = self._warm or (self.iteration, self.train_seconds)
            if self._plan_due():
                self._plan(progress)
            if self.iteration >= self.plan.total and self.batch < len(self.loader):
                progress.close()
                return False  # the plan ends inside this epoch
        progress.close()
        return True

    def _plan_due(self) -> bool:
        """Whether a budgeted run plans now: once PACE_ITERATIONS have been timed after this
        process's first iteration, then every 1/REPLANS of the planned run."""
        if self.config.schedule.max_minutes is None or self._warm is None:
            return False
        if not self.planned:
            return self.iteration - self._warm[0] >= PACE_ITERATIONS
        return self.iteration >= self._next_plan

    def _pace(self) -> float:
        """Seconds per iteration in this process, after its first iteration when there were
        others: an average over everything so far, so a moment of load moves it little."""
        assert self._warm is not None
        iterations, seconds = self.iteration - self._warm[0], self.train_seconds - self._warm[1]
        if iterations == 0:
            return self.train_seconds / max(self.iteration, 1)
        return seconds / iterations

    def _plan(self, progress: tqdm) -> None:
        """Fit the plan to the rest of the time budget at the pace so far (the first iterations
        are slower than the rest, and a machine's load changes, so the run plans again as it
        goes). A warmup already over stays over, and once the learning rate has begun to decay
        the milestones stay; only the length still follows the pace, to spend the budget. Rank
        0 decides for all."""
        plan = fit_plan(
            self.config.schedule, len(self.loader), self._pace(), self.iteration, self.train_seconds
        )
        if self.planned and self.iteration >= self.plan.warmup:
            plan = replace(plan, warmup=self.plan.warmup)
        if self.planned and self.plan.decay_begun(self.iteration):
            plan = replace(plan, milestones=self.plan.milestones)
        if self.group.distributed:
            chosen = [plan]
            dist.broadcast_object_list(chosen, src=0)
            plan = chosen[0]
        news = not self.planned or plan != self.plan
        self.plan, self.planned = plan, True
        self._next_plan = self.iteration + max(1, plan.total // REPLANS)
        progress.set_description(f"epoch {self.epoch + 1}/{-(-plan.total // len(self.loader))}")
        if self.group.is_main and news:
            logger.info(
                "%.3f s per iteration: %d of %d iterations fit in %g min "
                "(warmup %d, learning rate milestones %s)",
                self._pace(),
                plan.total,
                self.config.schedule.epochs * len(self.loader),
                self.config.schedule.max_minutes,
                plan.warmup,
                list(plan.milestones),
            )

    def _out_of_time(self) -> bool:
        budget = self.config.schedule.max_minutes
        return budget is not None and self.train_seconds >= 60 * budget

    def _step(
        self,
        images: Tensor,
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]],
        stop: StopSignal,
    ) -> tuple[dict[str, Tensor], int, bool]:
        """One optimisation step on a padded batch and each image's (height, width) in it;
        returns the detached losses (and their sum as ``loss``), the signal number every rank
        agreed to stop on (0 = go on) and whether every rank agreed that the time budget is
        spent (the step is still taken)."""
        images = images.to(self.device, non_blocking=True)
        image_sizes = image_sizes.to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            losses = self.model(images, targets, image_sizes=image_sizes)
        if not isinstance(losses, dict) or not losses:
            raise TypeError(
                f"in training mode the model must return a dict of losses, got {type(losses)}"
            )
        total = sum(losses.values())
        finite, stop_now, out_of_time = self._agree(
            bool(torch.isfinite(total)), stop.signum or 0, self._out_of_time()
        )
        if not finite:
            values = {name: float(value.detach()) for name, value in losses.items()}
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {values}")

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.config.optim.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.config.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        detached = {name: value.detach().float() for name, value in losses.items()}
        return {"loss": total.detach().float(), **detached}, stop_now, out_of_time

    def _agree(self, finite: bool, signum: int, out_of_time: bool) -> tuple[bool, int, bool]:
        """Make every rank take the same decision: stop if any rank saw a non-finite loss, a
        signal or the end of its time budget (a rank that left alone would leave the others
        waiting in a collective)."""
        if not self.group.distributed:
            return finite, signum, out_of_time
        flags = torch.tensor([int(not finite), signum, int(out_of_time)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return not flags[0].item(), int(flags[1].item()), bool(flags[2].item())

    # --- logging, checkpoints, evaluation -------------------------------------------------

    def _log(self, window: dict[str, list[Tensor]], progress: tqdm) -> None:
        if not self.group.is_main:
            return
        means = {name: torch.stack(values).mean().item() for name, values in window.items()}
        self.history.append({"iteration": self.iteration, **means})
        lr = self.optimizer.param_groups[0]["lr"]
        progress.set_postfix({**{k: f"{v:.4f}" for k, v in means.items()}, "lr": f"{lr:.2e}"})
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, self.iteration)
            self.writer.add_scalar("train/lr", lr, self.iteration)

    def save(self) -> None:
        """Write a checkpoint of the current moment (rank 0 writes, every rank waits)."""
        states = self._gather(rng_state())
        if self.group.is_main:
            state = {
                "epoch": self.epoch,
                "batch": self.batch,
                "iteration": self.iteration,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": states,
                "train_seconds": self.train_seconds,
                "plan": asdict(self.plan) if self.planned else None,
            }
            save_checkpoint(self.run_dir, self.model, self.config, state)
        if self.group.distributed:
            dist.barrier()

    def _restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch, self.iteration = state["epoch"], state["batch"], state["iteration"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.train_seconds = state.get("train_seconds", 0.0)
        if state.get("plan") is not None and self.config.schedule.max_minutes is not None:
            # A resumed run keeps the plan, and plans again from its pace after resuming.
            plan = state["plan"]
            self.plan = IterationPlan(plan["total"], plan["warmup"], tuple(plan["milestones"]))
            self.planned = True
            self._next_plan = self.iteration
        states = state["rng"]
        # Each rank resumes its own streams; with another world size, rank r takes r mod saved.
        set_rng_state(states[self.group.rank % len(states)])

    def _gather(self, value: Any) -> list[Any]:
        if not self.group.distributed:
            return [value]
        gathered: list[Any] = [None] * self.group.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def evaluate(self) -> dict[str, float]:
        """Evaluate on the test split; rank 0 logs the metrics and writes metrics.json."""
        if self.test_split is None:  # loaded once: CUHK-SYSU's annotations take a while
            self.test_split = load_test_split(self.config)
        metrics = evaluate_model(
            unwrap(self.model),
            self.config,
            self.device,
            self.test_split,
            predictions_path=self._predictions_path(),
        )
        if self.group.is_main:
            logger.info("evaluation after epoch %d: %s", self.epoch, format_metrics(metrics))
            if self.writer is not None:
                for name, value in metrics.items():
                    self.writer.add_scalar(f"eval/{name}", value, self.iteration)
            record = {"epoch": self.epoch, "iteration": self.iteration, "metrics": metrics}
            (self.run_dir / RUN_METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return metrics

    def _predictions_path(self) -> Path | None:
        return self.run_dir / RUN_PREDICTIONS_FILE if self.group.is_main else None

    def _tensorboard(self) -> Any:
        if not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "tensorboard: the tensorboard package is not installed "
                "(pip install tensorboard, or set tensorboard=false)"
            ) from None
        return SummaryWriter(log_dir=str(self.run_dir / RUN_TENSORBOARD_DIR))


def format_metrics(metrics: dict[str, float]) -> str:
    """``name=value`` pairs on one line."""
    return ", ".join(f"{name}={value:.4f}" for name, value in metrics.items())


def train(config: TrainConfig, build_model: ModelBuilder, resume: bool = False) -> dict[str, float]:
    """Train (or resume) the run described by `config`; returns the final metrics."""
    return Trainer(config, build_model, resume=resume).run()
