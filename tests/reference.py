"""The dense reference of the label path, which only tests and benchmarks call: the fast path
(train.targets.stored_token_probs, through train.geometry.cell_taps) is tested against it."""

import torch
import torch.nn.functional as F

from train.geometry import map_coordinates
from train.targets import top_k_probs


def densify(scores: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-cell class distributions [B, K, H, W] (float32) from top-k logits and class ids [B, k, H, W]: the top-k
    softmax (train.targets.top_k_probs) scattered into K classes; skipped cells (class id < 0) all zero."""
    probs = top_k_probs(scores, classes)
    dense = probs.new_zeros(probs.shape[0], num_classes, *probs.shape[2:])
    return dense.scatter_add_(1, classes.long().clamp(min=0), probs)


def resample_maps(probs: torch.Tensor, mappings: torch.Tensor, footprints: torch.Tensor,
                  img_size: int | tuple[int, int], grid: tuple[int, int], points: int = 2,
                  mode: str = "nearest") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token class distributions [B, K, h, w] and a validity mask [B, h, w] from per-cell ones [B, K, H, W],
    sampled as train.geometry.cell_taps says, by F.grid_sample (align_corners=False: -1 and +1 are the map's outer
    edges). A token is valid when a point lands inside the footprint on a labelled cell (not a skipped row's)."""
    uv, inside, size = map_coordinates(mappings.to(probs.device), footprints, probs.shape[2:], img_size, grid, points)
    # nearest: the centre of the cell a point falls in (no rounding ties inside grid_sample); bilinear: clamped
    # to the outer cell centres (border padding); outside points go far off the map, where zero padding reads 0
    uv = uv.floor() + 0.5 if mode == "nearest" else uv.clamp(min=0.5).minimum(size - 0.5)
    norm = torch.where(inside[..., None], uv / size * 2 - 1, -4.0).to(probs.dtype)
    out = sum(F.grid_sample(probs, norm[:, i], mode=mode, padding_mode="zeros", align_corners=False)
              for i in range(norm.shape[1]))
    if points > 1:
        out /= inside.sum(1, keepdim=True).clamp(min=1).to(probs.dtype)
    return out, out.sum(1) > 0
