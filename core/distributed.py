"""Ranks under torchrun: joining and leaving the process group, what DDP wraps, and sums and means over ranks."""

from typing import Any

import torch
import torch.distributed as dist
from timm.utils import reduce_tensor
from timm.utils.distributed import init_distributed_device_so
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.distributed import rank_and_world


def setup_distributed(device: str | None = None) -> tuple[torch.device, int, int]:
    """(device, rank, world size). Under torchrun, joins the process group with timm's helper (NCCL on CUDA,
    gloo on the CPU) and takes the local rank's GPU; `device` defaults to cuda when there is one, else cpu."""
    info = init_distributed_device_so(device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device(info["device"]), info["global_rank"], info["world_size"]


def leave_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return rank_and_world()[1]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over ranks (itself in one process)."""
    return reduce_tensor(tensor, world_size()) if world_size() > 1 else tensor


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks (itself in one process)."""
    if world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


class DenseForward(nn.Module):
    """What DDP wraps: the model's dense forward (its `forward_dense`, keyword arguments passed on) or, with
    dense=False, its plain forward. DDP only synchronises what runs through a module's `forward`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, dense: bool = True, **kwargs: Any) -> Any:
        return self.model.forward_dense(x, **kwargs) if dense else self.model(x)


def training_module(model: nn.Module, find_unused: bool = False) -> nn.Module:
    """DenseForward(model), inside DistributedDataParallel when there are several ranks."""
    module = DenseForward(model)
    if world_size() > 1:
        module = DistributedDataParallel(module, find_unused_parameters=find_unused)
    return module
