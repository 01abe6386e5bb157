"""The student's part of a training step: targets from the stored maps (or an online labeler), mixing, TL-Align, loss.

Every random draw of a step (mixing, Gumbel samples, drop-path) is seeded by (seed, epoch, step, rank)
(core.seeding), so a run resumed from an epoch checkpoint repeats exactly what the uninterrupted run did and
ranks draw independent noise for their local batches. The rest of the step (backward, optimizer, schedule,
EMA) is core.engine's.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.optim import autocast
from core.seeding import step_seed
from train.data import token_label_targets
from train.losses import token_label_loss
from train.mixing import Mixer, MixInfo, apply_mix, flip_perm, mix_tokens, sample_mixtoken
from train.targets import HardTokens, class_targets, pooled_label, token_targets
from train.tl_align import TokenLabelAligner, initial_labels_paper

MIX_MODES = ("none", "cutmix", "mixup", "both", "mixtoken")
TL_ALIGN_MODES = ("off", "paper", "dense")


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


class StudentObjective:
    """`objective(batch, epoch, step) -> (loss, parts)` for core.engine: turns a batch into targets, mixes it
    and runs the student (through `module`, core.distributed.training_module(student))."""

    def __init__(self, cfg: StepConfig, student: nn.Module, module: nn.Module, device: torch.device, *,
                 labeler: nn.Module | None = None, amp_dtype: torch.dtype | None = None):
        self.cfg, self.student, self.module, self.device = cfg, student, module, device
        self.labeler, self.amp_dtype = labeler, amp_dtype
        self.mixer = None
        if cfg.mix in ("cutmix", "mixup", "both"):
            self.mixer = Mixer(cfg.grid, cfg.mixup_alpha if cfg.mix in ("mixup", "both") else 0.0,
                               cfg.cutmix_alpha if cfg.mix in ("cutmix", "both") else 0.0, cfg.mix_prob,
                               cfg.switch_prob)
        self.aligner = TokenLabelAligner(student) if cfg.tl_align != "off" else None

    def targets(self, batch: dict[str, torch.Tensor], generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor | HardTokens | None, torch.Tensor | None]:
        """(class targets [B, K], token targets ([B, K, h, w] or HardTokens) or None, valid [B, h, w] or None),
        unmixed."""
        c = self.cfg
        tokens = valid = pooled = None
        if c.token_labels and self.labeler is not None:
            tokens, valid, pooled = self.online_targets(batch["clean"], generator)
        elif c.token_labels:
            tokens, valid, pooled = token_label_targets(batch, c.num_classes, c.img_size, c.grid, kind=c.target,
                                                        tau=c.tau, smoothing=c.smoothing, points=c.points,
                                                        generator=generator)
        cls = class_targets(batch["cls"], c.num_classes, c.smoothing, pooled, c.map_weight)
        return cls.to(self.device), tokens, valid

    @torch.no_grad()
    def online_targets(self, clean: torch.Tensor, generator: torch.Generator
                       ) -> tuple[torch.Tensor | HardTokens, torch.Tensor, torch.Tensor]:
        """STL's online teacher: the labeler on the clean, spatially aligned view, inside the step."""
        c = self.cfg
        with autocast(self.device, self.amp_dtype):
            _, token_logits, grid = self.labeler.forward_dense(clean)
        probs = token_logits.float().softmax(-1).transpose(1, 2).unflatten(2, grid)  # [B, K, h', w']
        if tuple(grid) != tuple(c.grid):
            probs = F.interpolate(probs, size=c.grid, mode="area")
        valid = torch.ones(probs.shape[0], *c.grid, dtype=torch.bool, device=probs.device)
        return token_targets(probs, c.target, c.tau, c.smoothing, generator), valid, pooled_label(probs)

    def draw_mix(self, batch_size: int, rng: np.random.Generator) -> MixInfo:
        c = self.cfg
        if c.mix == "mixtoken":
            return sample_mixtoken(batch_size, c.grid, c.cutmix_alpha, rng)
        if self.mixer is not None:
            self.mixer.rng = rng
            return self.mixer.sample(batch_size)
        return MixInfo("none", 1.0, None, flip_perm(batch_size), c.grid)

    def __call__(self, batch: dict[str, Any], epoch: int, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, detached parts) of the student in training mode on `batch` as step (epoch, step) draws it."""
        c = self.cfg
        seed = step_seed(c.seed, epoch, step, c.rank)  # also drop-path and all else drawing from global RNGs
        generator = torch.Generator(self.device).manual_seed(seed)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        cls_t, tok_t, valid = self.targets(batch, generator)
        info = self.draw_mix(batch["image"].shape[0], np.random.default_rng(seed))
        images, cls_t, tok_t, valid = apply_mix(info, batch["image"], cls_t, tok_t, valid)
        if isinstance(tok_t, HardTokens) and c.tl_align == "dense":  # TL-Align moves distributions
            tok_t = tok_t.dense()
        if isinstance(tok_t, HardTokens):  # ids [B, M, h, w] -> [B, M, N], tokens row-major like the logits
            tok_t, valid = tok_t.map(lambda t: t.flatten(2)), valid.flatten(1)
        elif tok_t is not None:  # [B, K, h, w] -> [B, N, K] and [B, N]
            tok_t, valid = tok_t.flatten(2).transpose(1, 2), valid.flatten(1)
        self.module.train()
        with autocast(self.device, self.amp_dtype):
            cls_logits, token_logits, aligned = self.forward(images, batch["cls"], cls_t, tok_t, info)
        if aligned is not None:
            cls_t = aligned.cls
            tok_t = aligned.tokens if c.tl_align == "dense" and tok_t is not None else tok_t
        return token_label_loss(cls_logits.float(), cls_t, None if token_logits is None else token_logits.float(),
                                tok_t, valid, c.beta)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, cls_t: torch.Tensor, tok_t: torch.Tensor | None,
                info: MixInfo):
        """(class logits, token logits or None, aligned labels or None) of the student on the mixed batch."""
        c = self.cfg
        mix = info if info.mode == "mixtoken" else None
        if not c.token_labels and self.aligner is None and mix is None:
            return self.module(images, dense=False), None, None
        if self.aligner is None:  # MixToken needs the dense forward even without token labels
            cls_logits, token_logits, _ = self.module(images, mix=mix)
            return cls_logits, token_logits if c.token_labels else None, None
        y_cls, y_tokens = self.initial_labels(labels, cls_t, tok_t, info)
        if mix is not None:  # the labels travel with the mixed tokens, then are un-mixed like the token logits
            y_tokens = mix_tokens(y_tokens, info)
        with self.aligner.align(y_cls, y_tokens) as aligned:
            cls_logits, token_logits, _ = self.module(images, mix=mix)
        if mix is not None:
            aligned.tokens = mix_tokens(aligned.tokens, info)
        return cls_logits, token_logits if c.token_labels else None, aligned

    def initial_labels(self, labels: torch.Tensor, cls_t: torch.Tensor, tok_t: torch.Tensor | None,
                       info: MixInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """TL-Align's starting labels: the dense (mixed) token maps, or the paper's source-image labels."""
        c = self.cfg
        if c.tl_align == "dense" and tok_t is not None:
            return cls_t, tok_t
        source = info.source().flatten(1).to(cls_t.device)  # [B, N] batch index of each token's content
        return initial_labels_paper(source, class_targets(labels, c.num_classes, c.smoothing).to(cls_t.device), cls_t)
