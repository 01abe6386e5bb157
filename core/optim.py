"""The optimisation of one model: a timm optimizer, a per-step cosine schedule, EMA weights, mixed precision
(timm's NativeScaler for fp16) and gradient clipping; one `step` per batch, one state to checkpoint."""

import argparse
import contextlib
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch import nn

AMP_MODES = ("auto", "off", "bf16", "fp16")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp: auto is bf16 on CUDA where supported, else fp16; off (None) on the CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision in `dtype` on `device`, or nothing when dtype is None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off on this device type, for code inside an autocast region that must compute in full precision
    (nothing to turn off on a device type without autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Optimization:
    """Optimizer, schedule, EMA and loss scaling of `model`, from the training flags (core.flags)."""

    def __init__(self, model: nn.Module, args: argparse.Namespace, steps_per_epoch: int, device: torch.device):
        self.model, self.clip_grad = model, args.clip_grad or None
        self.optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched="cosine", num_epochs=max(args.epochs, 1),
                                                warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                                min_lr=args.min_lr, step_on_epochs=False,
                                                updates_per_epoch=steps_per_epoch)
        self.ema = ModelEmaV3(model, decay=args.ema_decay, use_warmup=True, warmup_power=3 / 4)
        self.amp_dtype = amp_dtype(args.amp, device)
        self.scaler = NativeScaler(device.type) if self.amp_dtype == torch.float16 else None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor, updates: int) -> None:
        """Backward, clip, optimizer step; then the schedule and the EMA at `updates` optimizer steps in all."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler(loss, self.optimizer, clip_grad=self.clip_grad, parameters=self.model.parameters())
        else:
            loss.backward()
            if self.clip_grad is not None:
                dispatch_clip_grad(self.model.parameters(), self.clip_grad)
            self.optimizer.step()
        self.scheduler.step_update(num_updates=updates)
        self.ema.update(self.model, step=updates)

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
