"""Which process this is under torch.distributed: the one helper every layer may ask."""

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's torch.distributed rank and world size ((0, 1) when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
