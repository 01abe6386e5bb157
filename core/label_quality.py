"""Token-label quality against per-pixel masks: foreground, background and distractor token accuracy."""

from dataclasses import dataclass, fields

import torch


def mask_token_targets(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """The true class of each token from a per-pixel mask, or -1 for a background token.

    masks: int [B, Hm, Wm] holding class + 1 per pixel (0 = background), in the geometry of the model input.
    Token (i, j) of an H x W grid covers mask rows floor(i * Hm / H) .. floor((i + 1) * Hm / H) - 1 and likewise
    columns, i.e. the input pixels of that patch when Hm, Wm are the input size. A token is foreground when
    strictly more than half of its pixels are non-zero; its true class is the class with most pixels in it
    (ties go to the lower class index). Returns long [B, H * W], tokens in row-major order.
    """
    B, Hm, Wm = masks.shape
    H, W = grid
    if masks.numel() and int(masks.max()) > num_classes:
        raise ValueError(f"mask value {int(masks.max())} exceeds num_classes + 1 = {num_classes + 1}")
    rows = torch.arange(Hm, device=masks.device) * H // Hm
    cols = torch.arange(Wm, device=masks.device) * W // Wm
    cell = (rows[:, None] * W + cols[None, :]).expand(B, Hm, Wm)
    slot = (torch.arange(B, device=masks.device)[:, None, None] * (H * W) + cell) * (num_classes + 1) + masks.long()
    counts = torch.bincount(slot.flatten(), minlength=B * H * W * (num_classes + 1))
    counts = counts.view(B, H * W, num_classes + 1)
    foreground = counts[..., 1:].sum(-1) * 2 > counts.sum(-1)
    return torch.where(foreground, counts[..., 1:].argmax(-1), -1)


@dataclass
class TokenCounts:
    """Correct/total token counts; add batches with `+`, then `rates()`.

    - fg: foreground tokens (see `mask_token_targets`) whose argmax is their true class.
    - bg: background tokens whose argmax is the image's class (the label a background token gets from the image).
    - distractor: the foreground tokens whose true class differs from the image's class (a digit other than
      the one the image is labelled with), argmax equal to that true class: what image-level labels cannot give.
    """

    fg_correct: int = 0
    fg_total: int = 0
    bg_correct: int = 0
    bg_total: int = 0
    distractor_correct: int = 0
    distractor_total: int = 0

    def __add__(self, other: "TokenCounts") -> "TokenCounts":
        return TokenCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def rates(self) -> dict[str, float | None]:
        """token_fg_acc, token_bg_acc, token_distractor_acc in percent (like timm's top1); None when no such token."""
        return {f"token_{kind}_acc": 100.0 * getattr(self, f"{kind}_correct") / getattr(self, f"{kind}_total")
                if getattr(self, f"{kind}_total") else None for kind in ("fg", "bg", "distractor")}


def token_accuracy(token_logits: torch.Tensor, grid: tuple[int, int], masks: torch.Tensor,
                   labels: torch.Tensor) -> TokenCounts:
    """Count correct tokens of a batch: token_logits [B, N, K] on an (H, W) grid, masks [B, Hm, Wm], labels [B]."""
    targets = mask_token_targets(masks, grid, token_logits.shape[-1])
    predicted = token_logits.argmax(-1)
    foreground = targets >= 0
    background = ~foreground
    distractor = foreground & (targets != labels[:, None])
    correct = predicted == targets
    return TokenCounts(
        fg_correct=int((correct & foreground).sum()), fg_total=int(foreground.sum()),
        bg_correct=int(((predicted == labels[:, None]) & background).sum()), bg_total=int(background.sum()),
        distractor_correct=int((correct & distractor).sum()), distractor_total=int(distractor.sum()),
    )
