"""What the demo builds and where, and how it reports."""

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPOSITORY / "configs" / "tiny" / "alignps_synthetic.yaml"
DEFAULT_MINUTES = 9.0  # with the install and the other stages (4 to 5 min), 15 min on 2 cores


class DemoError(Exception):
    """A mistake the user can fix; the message says what to do."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo builds and where. ``synthetic`` (generator options) and ``overrides``
    (``key=value`` config fields) make a smaller demo for tests; ``parity`` compares ONNX
    Runtime with PyTorch after the export; ``train`` trains a model even where the shipped one
    would do."""

    data_dir: Path = Path("data/demo")
    config: Path = DEFAULT_CONFIG
    seed: int = 0
    minutes: float = DEFAULT_MINUTES
    host: str = "127.0.0.1"
    port: int = 8000
    serve: bool = True
    synthetic: dict[str, Any] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    parity: bool = True
    train: bool = False

    def wants_shipped_model(self) -> bool:
        """Whether the shipped model is what these options would train: the default config
        and data, and no --train."""
        return (
            not self.train
            and self.config.resolve() == DEFAULT_CONFIG
            and not self.synthetic
            and not self.overrides
        )


def log(line: str = "") -> None:
    """Print a line now: stages take minutes, their lines should not wait in a buffer."""
    print(line, flush=True)


@dataclass
class Stage:
    """One stage's name, duration and a note on what it did (``reusing ...``, counts)."""

    name: str
    seconds: float = 0.0
    note: str = ""


class Stages:
    """Announces each stage, times it and prints the table of every stage's time at the end."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.done: list[Stage] = []
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def run(self, name: str, what: str) -> Iterator[Stage]:
        stage = Stage(name)
        log(f"\n[{len(self.done) + 1}/{self.count}] {name}: {what}")
        start = time.perf_counter()
        yield stage
        stage.seconds = time.perf_counter() - start
        self.done.append(stage)
        note = f": {stage.note}" if stage.note else ""
        log(f"      {name} done in {stage.seconds:.1f} s{note}")

    def table(self) -> str:
        lines = [f"{'stage':<10} {'seconds':>8}  what"]
        lines += [f"{s.name:<10} {s.seconds:>8.1f}  {s.note}" for s in self.done]
        lines.append(f"{'total':<10} {time.perf_counter() - self.started:>8.1f}")
        return "\n".join(lines)
