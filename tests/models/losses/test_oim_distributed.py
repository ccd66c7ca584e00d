"""Under torch.distributed the OIM memory is updated with every rank's samples."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from models.losses import OIMLoss

REPO_ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("ddp_worker.py")

# The ranks see batches of different sizes, so the gather has to pad and trim.
RANK_BATCHES = [
    (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, -1])),
    (
        torch.tensor([[0.0, 1.0], [0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]]),
        torch.tensor([0, 1, -1, -1]),
    ),
]


def run_ranks(tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    """Run one training-mode OIMLoss(2, 3, 4) call per rank; return each rank's state_dict."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    world_size = str(len(RANK_BATCHES))
    processes, states = [], []
    for rank, batch in enumerate(RANK_BATCHES):
        batch_file, state_file = tmp_path / f"batch{rank}.pt", tmp_path / f"state{rank}.pt"
        torch.save(batch, batch_file)
        states.append(state_file)
        command = [sys.executable, str(WORKER), str(rank), world_size, str(tmp_path / "rdzv")]
        processes.append(
            subprocess.Popen(
                [*command, str(batch_file), str(state_file)],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for process in processes:
        log, _ = process.communicate(timeout=120)
        assert process.returncode == 0, log
    return [torch.load(state) for state in states]


def test_every_rank_ends_with_the_memory_of_one_process_seeing_all_batches_in_rank_order(
    tmp_path,
):
    rank_states = run_ranks(tmp_path)

    single = OIMLoss(2, 3, 4)
    single(
        torch.cat([features for features, _ in RANK_BATCHES]),
        torch.cat([pids for _, pids in RANK_BATCHES]),
    )
    for rank, state in enumerate(rank_states):
        for name, expected in single.state_dict().items():
            torch.testing.assert_close(state[name], expected, msg=f"rank {rank}: {name}")
    # Identity 0 was seen on both ranks: its row is the mean of (1, 0) and (0, 1), normalised.
    torch.testing.assert_close(rank_states[1]["lut"][0], torch.tensor([1.0, 1.0]) / 2**0.5)
    # The queue holds rank 0's unlabeled feature, then rank 1's two, in that order.
    expected_queue = torch.tensor([[0.0, 1.0], [0.8, 0.6], [-1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(rank_states[0]["queue"], expected_queue)
