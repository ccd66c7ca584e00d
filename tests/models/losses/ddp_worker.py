"""One rank of the two-process OIM memory test (started by test_oim_distributed.py).

Usage: python ddp_worker.py RANK WORLD_SIZE RENDEZVOUS_FILE BATCH_FILE STATE_FILE

Joins a gloo process group, runs one training-mode OIMLoss(2, 3, 4) call on the (features, pids)
saved in BATCH_FILE and saves the loss module's state_dict to STATE_FILE.
"""

import sys

import torch
import torch.distributed as dist

from models.losses import OIMLoss


def main() -> None:
    rank, world_size = int(sys.argv[1]), int(sys.argv[2])
    rendezvous, batch_file, state_file = sys.argv[3:6]
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    try:
        features, pids = torch.load(batch_file)
        oim = OIMLoss(2, 3, 4)
        oim(features, pids)
        torch.save(oim.state_dict(), state_file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
