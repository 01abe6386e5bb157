"""The student's part of a training step: targets from the stored maps (or an online labeler), mixing, TL-Align, loss.

Every random draw of a step (mixing, Gumbel samples, drop-path) is seeded by (seed, epoch, step, rank)
(core.seeding), so a run resumed from an epoch checkpoint repeats exactly what the uninterrupted run did and
ranks draw independent noise for their local batches. The device's draws come from torch's global generator,
which the step's seed resets. The rest of the step (backward, optimizer, schedule, EMA) is core.engine's.

Nothing here makes the host wait for the device: no value computed on the device is read on the host, no
tensor is sent to it but the batch (non-blocking), and no shape depends on data; tests/test_no_sync.py checks
it. With `compile` (torch.compile) the label path (targets from the stored maps, class targets) and the loss are
compiled whole, and so is the student's forward where no hooks are needed (everything but MixToken draws and
TL-Align, which reach inside the model through forward hooks).
"""

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.optim import autocast
from core.seeding import step_seed
from train.data import token_label_targets
from train.losses import token_label_loss
from train.mixing import Mixer, MixInfo, apply_mix, mix_tokens, sample_mixtoken
from train.targets import HardTokens, class_targets, pooled_label, token_targets
from train.tl_align import TokenLabelAligner, initial_labels_paper

MIX_MODES = ("none", "cutmix", "mixup", "both", "mixtoken")
TL_ALIGN_MODES = ("off", "paper", "dense")
# --compile: torch.compile's arguments per mode; aot_eager captures the graphs without generating code (a check)
COMPILE_MODES = {"default": {}, "reduce-overhead": {"mode": "reduce-overhead"},
                 "max-autotune": {"mode": "max-autotune"}, "aot_eager": {"backend": "aot_eager"}}


@dataclass
class StepConfig:
    num_classes: int
    img_size: int
    grid: tuple[int, int]
    token_labels: bool = True       # False: the --no-token-labels baseline (class loss only)
    beta: float = 1.0               # weight of the mean token cross-entropy
    target: str = "gumbel"          # token targets: gumbel, softmax or argmax
    tau: float = 1.0                # Gumbel temperature
    smoothing: float = 0.1
    map_weight: float = 0.0         # blend of the map's pooled label into the class target (LV-ViT-style)
    points: int = 2                 # sample points per token side when resampling a map
    mix: str = "none"
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    tl_align: str = "off"
    seed: int = 0
    rank: int = 0                   # distributed rank: part of every step's seed


def stored_targets(batch: dict[str, torch.Tensor], c: StepConfig
                   ) -> tuple[torch.Tensor, torch.Tensor | HardTokens | None, torch.Tensor | None]:
    """(class targets [B, K], token targets ([B, K, h, w] or HardTokens) or None, valid [B, h, w] or None), unmixed,
    from the batch's stored maps (train.data.token_label_targets), or the class targets alone without token labels."""
    tokens = valid = pooled = None
    if c.token_labels:
        tokens, valid, pooled = token_label_targets(batch, c.num_classes, c.img_size, c.grid, kind=c.target, tau=c.tau,
                                                    smoothing=c.smoothing, points=c.points, pooled=c.map_weight > 0)
    return class_targets(batch["cls"], c.num_classes, c.smoothing, pooled, c.map_weight), tokens, valid


class StudentObjective:
    """`objective(batch, epoch, step) -> (loss, parts)` for core.engine: turns a batch into targets, mixes it
    and runs the student (through `module`, core.distributed.training_module(student)); `compile` is a key of
    COMPILE_MODES, or None to run eagerly."""

    def __init__(self, cfg: StepConfig, student: nn.Module, module: nn.Module, device: torch.device, *,
                 labeler: nn.Module | None = None, amp_dtype: torch.dtype | None = None, compile: str | None = None):
        self.cfg, self.student, self.module, self.device = cfg, student, module, device
        self.labeler, self.amp_dtype = labeler, amp_dtype
        self.mixer = None
        if cfg.mix in ("cutmix", "mixup", "both"):
            self.mixer = Mixer(cfg.grid, cfg.mixup_alpha if cfg.mix in ("mixup", "both") else 0.0,
                               cfg.cutmix_alpha if cfg.mix in ("cutmix", "both") else 0.0, cfg.mix_prob,
                               cfg.switch_prob)
        self.aligner = TokenLabelAligner(student) if cfg.tl_align != "off" else None
        self.dense_align = cfg.tl_align == "dense" and cfg.token_labels  # else the paper form, if any
        compiled = partial(torch.compile, **COMPILE_MODES[compile]) if compile else lambda fn, **_: fn
        self.stored_targets = compiled(stored_targets, fullgraph=True)
        self.loss = compiled(token_label_loss, fullgraph=True)
        self.plain_module = compiled(module)  # the forward without hooks
        self.labeler_forward = None if labeler is None else compiled(labeler.forward_dense)

    def targets(self, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor | HardTokens | None, torch.Tensor | None]:
        """(class targets [B, K], token targets ([B, K, h, w] or HardTokens) or None, valid [B, h, w] or None),
        unmixed, drawn from torch's global generator."""
        c = self.cfg
        if not (c.token_labels and self.labeler is not None):
            return self.stored_targets(batch, c)
        tokens, valid, pooled = self.online_targets(batch["clean"])
        return class_targets(batch["cls"], c.num_classes, c.smoothing, pooled, c.map_weight), tokens, valid

    @torch.no_grad()
    def online_targets(self, clean: torch.Tensor) -> tuple[torch.Tensor | HardTokens, torch.Tensor, torch.Tensor]:
        """STL's online teacher: the labeler on the clean, spatially aligned view, inside the step."""
        c = self.cfg
        with autocast(self.device, self.amp_dtype):
            _, token_logits, grid = self.labeler_forward(clean)
        probs = token_logits.float().softmax(-1).transpose(1, 2).unflatten(2, grid)  # [B, K, h', w']
        if tuple(grid) != tuple(c.grid):
            probs = F.interpolate(probs, size=c.grid, mode="area")
        valid = torch.ones(probs.shape[0], *c.grid, dtype=torch.bool, device=probs.device)
        return token_targets(probs, c.target, c.tau, c.smoothing), valid, pooled_label(probs)

    def draw_mix(self, rng: np.random.Generator) -> MixInfo:
        c = self.cfg
        if c.mix == "mixtoken":
            return sample_mixtoken(c.grid, c.cutmix_alpha, rng)
        if self.mixer is not None:
            self.mixer.rng = rng
            return self.mixer.sample()
        return MixInfo("none", 1.0, None, c.grid)

    def __call__(self, batch: dict[str, Any], epoch: int, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached parts) of the student in training mode on `batch` as step (epoch, step) draws it."""
        c = self.cfg
        seed = step_seed(c.seed, epoch, step, c.rank)  # torch's global generators: Gumbel noise, drop-path
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        cls_t, tok_t, valid = self.targets(batch)
        info = self.draw_mix(np.random.default_rng(seed))
        images, cls_t, tok_t, valid = apply_mix(info, batch["image"], cls_t, tok_t, valid)
        if isinstance(tok_t, HardTokens) and self.dense_align:  # TL-Align moves distributions
            tok_t = tok_t.dense()
        if isinstance(tok_t, HardTokens):  # ids [B, M, h, w] -> [B, M, N], tokens row-major like the logits
            tok_t, valid = tok_t.map(lambda t: t.flatten(2)), valid.flatten(1)
        elif tok_t is not None:  # [B, K, h, w] -> [B, N, K] and [B, N]
            tok_t, valid = tok_t.flatten(2).transpose(1, 2), valid.flatten(1)
        self.module.train()
        with autocast(self.device, self.amp_dtype):
            cls_logits, token_logits, aligned = self.forward(images, batch["cls"], cls_t, tok_t, valid, info)
        if aligned is not None:
            cls_t = aligned.cls
            tok_t = aligned.tokens if self.dense_align else tok_t
        return self.loss(cls_logits, cls_t, token_logits, tok_t, valid, c.beta)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, cls_t: torch.Tensor, tok_t: torch.Tensor | None,
                valid: torch.Tensor | None, info: MixInfo):
        """(class logits, token logits or None, aligned labels or None) of the student on the mixed batch."""
        c = self.cfg
        mix = info if info.mode == "mixtoken" else None
        if self.aligner is None and mix is None:
            if not c.token_labels:
                return self.plain_module(images, dense=False), None, None
            cls_logits, token_logits, _ = self.plain_module(images)
            return cls_logits, token_logits, None
        if self.aligner is None:  # MixToken needs the dense forward even without token labels
            cls_logits, token_logits, _ = self.module(images, mix=mix)
            return cls_logits, token_logits if c.token_labels else None, None
        y_cls, y_tokens, y_valid = self.initial_labels(labels, cls_t, tok_t, valid, info)
        with self.aligner.align(y_cls, y_tokens, valid=y_valid) as aligned:
            cls_logits, token_logits, _ = self.module(images, mix=mix)
        if mix is not None and self.dense_align:  # back to each image's own token order, like the token logits
            aligned.tokens = mix_tokens(aligned.tokens, info)
        return cls_logits, token_logits if c.token_labels else None, aligned

    def initial_labels(self, labels: torch.Tensor, cls_t: torch.Tensor, tok_t: torch.Tensor | None,
                       valid: torch.Tensor | None, info: MixInfo
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """TL-Align's starting labels in the order of the tokens the model sees: (class row [B, K], token rows
        [B, N, K], which tokens have a label [B, N] or None for all).

        Dense form: the (mixed) token maps, moved with their tokens' content under MixToken (the maps are in each
        image's own token order). Paper form: each token's source-image label, which MixToken's box already
        gives the tokens it moved, and the class target.
        """
        c = self.cfg
        if self.dense_align:
            if info.mode != "mixtoken":
                return cls_t, tok_t, valid
            return cls_t, mix_tokens(tok_t, info), mix_tokens(valid.unsqueeze(-1), info).squeeze(-1)
        source = info.source(len(labels), labels.device).flatten(1)  # [B, N] batch index of each token's content
        return *initial_labels_paper(source, class_targets(labels, c.num_classes, c.smoothing), cls_t), None
