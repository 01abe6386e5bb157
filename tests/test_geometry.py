"""Geometry of the student data path: one mapping per sample, realised alike on the image and on the label map."""

import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from reference import densify, resample_maps
from timm.data import create_transform
from timm.data.auto_augment import NAME_TO_OP, AugmentOp, rand_augment_transform

from core.imaging.mappings import (
    crop_mapping,
    hflip_mapping,
    rotate_mapping,
    shear_mapping,
    translate_mapping,
)
from core.imaging.pil import warp_image
from core.posterize import safe_posterize
from train.augment import GEOMETRIC_OPS, PIL_OPS, LabelAwareEvalTransform, LabelAwareTransform, _Canvas
from train.geometry import cell_taps, map_coordinates

torch.set_num_threads(1)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def center_square(width: int, height: int, crop_pct: float = 1.0) -> np.ndarray:
    side = crop_pct * min(width, height)
    return np.array([(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2])


def position_map(batch: int, map_hw: tuple[int, int]) -> torch.Tensor:
    """Per-cell distributions whose class at cell (r, c) is r * W + c (K = H * W), through densify."""
    h, w = map_hw
    classes = torch.arange(h * w, dtype=torch.int16).reshape(1, 1, h, w).expand(batch, 1, h, w)
    return densify(torch.zeros(batch, 1, h, w, dtype=torch.float16), classes, h * w)


def geometric_only(transform: LabelAwareTransform) -> LabelAwareTransform:
    """The same transform with RandAugment restricted to its geometric ops, applied at every layer."""
    transform.augment.ops = [op for op in transform.augment.ops if op.name in GEOMETRIC_OPS]
    for op in transform.augment.ops:
        op.prob = 1.0
    return transform


def random_mappings(rng: np.random.Generator, image_wh: tuple[int, int], size: int, n: int) -> list[np.ndarray]:
    """Explicit compositions of crops, flips, rotations, shears and translations, plus tie-prone exact ones."""
    width, height = image_wh
    out = [crop_mapping(0, 0, width, height, size), crop_mapping(0, 0, width, height, size) @ hflip_mapping(size),
           crop_mapping(0, 0, width, height, size) @ rotate_mapping(90, size)]
    for _ in range(n):
        cw, ch = rng.uniform(0.2, 1.0) * width, rng.uniform(0.2, 1.0) * height
        m = crop_mapping(rng.uniform(0, width - cw), rng.uniform(0, height - ch), cw, ch, size)
        if rng.random() < 0.5:
            m = m @ hflip_mapping(size)
        m = m @ rotate_mapping(rng.uniform(-45, 45), size) @ shear_mapping(*rng.uniform(-0.3, 0.3, 2), size)
        out.append(m @ translate_mapping(*rng.uniform(-0.45, 0.45, 2) * size))
    return out


def transform_mappings(image_wh: tuple[int, int], size: int, n: int, seed: int) -> list[np.ndarray]:
    """Mappings the training transform draws (crop, flip, geometric RandAugment at magnitude 9)."""
    seed_all(seed)
    t = geometric_only(LabelAwareTransform(size, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0))
    img = Image.new("RGB", image_wh)
    return [t.draw(img).mapping for _ in range(n)]


def expected_cells(mapping: np.ndarray, footprint: np.ndarray, map_hw: tuple[int, int], size: int,
                   grid: tuple[int, int], points: int = 1) -> list[list[list[int]]]:
    """Per token, the map cells its sample points fall in (r*W + c), computed point by point in numpy."""
    m = np.asarray(mapping, dtype=np.float64)
    x0, y0, x1, y1 = footprint
    mh, mw = map_hw
    h, w = grid
    cells = []
    for r in range(h):
        row = []
        for c in range(w):
            hits = []
            for a in range(points):
                for b in range(points):
                    x, y = (c + (b + 0.5) / points) * size / w, (r + (a + 0.5) / points) * size / h
                    px = m[0, 0] * x + m[0, 1] * y + m[0, 2]
                    py = m[1, 0] * x + m[1, 1] * y + m[1, 2]
                    u, v = (px - x0) / (x1 - x0) * mw, (py - y0) / (y1 - y0) * mh
                    if 0 <= u < mw and 0 <= v < mh:
                        hits.append(int(np.floor(v)) * mw + int(np.floor(u)))
            row.append(hits)
        cells.append(row)
    return cells


PAIRS = [((8, 8), (8, 8), 64), ((8, 8), (14, 14), 224), ((8, 8), (4, 4), 64), ((8, 8), (16, 16), 224), ((18, 18), (14, 14), 224),
         ((18, 18), (16, 16), 224), ((18, 18), (4, 4), 64), ((14, 14), (8, 8), 64)]


@pytest.mark.parametrize("map_hw,grid,size", PAIRS)
@pytest.mark.parametrize("image_wh", [(300, 200), (151, 230), (200, 200)])
def test_token_centre_labels_exact(map_hw, grid, size, image_wh):
    rng = np.random.default_rng(hash((map_hw, grid, image_wh)) % 2**32)
    mappings = random_mappings(rng, image_wh, size, 6) + transform_mappings(image_wh, size, 6, seed=size)
    footprint = center_square(*image_wh)
    out, valid = resample_maps(position_map(len(mappings), map_hw), torch.tensor(np.stack(mappings)),
                               torch.tensor(footprint), size, grid, points=1, mode="nearest")
    assert out.shape == (len(mappings), map_hw[0] * map_hw[1], *grid)
    counts = [0, 0]
    for i, m in enumerate(mappings):
        for r, row in enumerate(expected_cells(m, footprint, map_hw, size, grid)):
            for c, hits in enumerate(row):
                assert bool(valid[i, r, c]) == bool(hits), (i, r, c)
                want = torch.zeros(out.shape[1])
                if hits:
                    want[hits[0]] = 1.0
                assert torch.equal(out[i, :, r, c], want), (i, r, c, hits, out[i, :, r, c].nonzero())
                counts[bool(hits)] += 1
    assert counts[0] > 0 and counts[1] > 0  # both valid and invalid tokens were checked


def test_cell_boundary_ties_follow_half_open_cells():
    # 4x4 tokens of a 64-pixel view of a 200x200 image over an 8x8 map: every token centre lies exactly on a
    # cell corner, (2c+1, 2r+1) in cell units, and belongs to the cell right/below it
    m = crop_mapping(0, 0, 200, 200, 64)
    out, valid = resample_maps(position_map(1, (8, 8)), torch.tensor(m[None]), torch.tensor([0.0, 0, 200, 200]), 64,
                               (4, 4), points=1)
    cells = out[0].argmax(0)
    assert valid.all()
    assert cells.tolist() == [[(2 * r + 1) * 8 + 2 * c + 1 for c in range(4)] for r in range(4)]


@pytest.mark.parametrize("map_hw,grid,size", [((8, 8), (4, 4), 64), ((18, 18), (14, 14), 224)])
def test_multi_point_nearest_is_the_share_of_points_per_cell(map_hw, grid, size):
    image_wh = (240, 180)
    rng = np.random.default_rng(0)
    mappings = random_mappings(rng, image_wh, size, 8)
    footprint = center_square(*image_wh, crop_pct=0.875)
    out, valid = resample_maps(position_map(len(mappings), map_hw), torch.tensor(np.stack(mappings)),
                               torch.tensor(footprint), size, grid, points=3, mode="nearest")
    partial = 0
    for i, m in enumerate(mappings):
        for r, row in enumerate(expected_cells(m, footprint, map_hw, size, grid, points=3)):
            for c, hits in enumerate(row):
                want = np.bincount(hits, minlength=out.shape[1]) / max(len(hits), 1)
                np.testing.assert_allclose(out[i, :, r, c].numpy(), want, atol=1e-6)
                assert bool(valid[i, r, c]) == bool(hits)
                partial += 0 < len(hits) < 9
    assert partial > 0  # tokens half inside the footprint average only their inside points


def test_bilinear_reproduces_a_linear_map():
    # channel 0 holds each cell's centre u = c + 0.5, channel 1 its v = r + 0.5: bilinear sampling with the
    # right align_corners=False normalisation returns the point's own (u, v), clamped to the outer centres
    mh, mw, size, grid = 6, 10, 96, (12, 12)
    ramp = torch.stack(torch.meshgrid(torch.arange(mh) + 0.5, torch.arange(mw) + 0.5, indexing="ij")[::-1])
    image_wh = (320, 200)
    footprint = np.array([20.0, 10.0, 300.0, 178.0])
    mappings = random_mappings(np.random.default_rng(1), image_wh, size, 6)
    out, valid = resample_maps(ramp[None].expand(len(mappings), 2, mh, mw).double(),
                               torch.tensor(np.stack(mappings)), torch.tensor(footprint), size, grid, points=1,
                               mode="bilinear")
    for i, m in enumerate(mappings):
        ys, xs = np.meshgrid((np.arange(12) + 0.5) * 8, (np.arange(12) + 0.5) * 8, indexing="ij")
        px = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        py = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        u = (px - footprint[0]) / (footprint[2] - footprint[0]) * mw
        v = (py - footprint[1]) / (footprint[3] - footprint[1]) * mh
        inside = (u >= 0) & (u < mw) & (v >= 0) & (v < mh)
        assert (valid[i].numpy() == inside).all()
        np.testing.assert_allclose(out[i, 0].numpy()[inside], np.clip(u, 0.5, mw - 0.5)[inside], atol=1e-9)
        np.testing.assert_allclose(out[i, 1].numpy()[inside], np.clip(v, 0.5, mh - 0.5)[inside], atol=1e-9)


@pytest.mark.parametrize("points", [1, 2])
def test_nearest_taps_are_the_cells_of_the_points(points):
    map_hw, grid, size, image_wh = (18, 18), (14, 14), 224, (240, 180)
    mappings = random_mappings(np.random.default_rng(3), image_wh, size, 8)
    footprint = center_square(*image_wh, crop_pct=0.875)
    cells, weights, count = cell_taps(torch.tensor(np.stack(mappings)), torch.tensor(footprint), map_hw, size, grid,
                                      points)
    assert cells.shape == weights.shape == (len(mappings), points**2, *grid) and count.shape == (len(mappings), 1, *grid)
    outside = 0
    for i, m in enumerate(mappings):
        for r, row in enumerate(expected_cells(m, footprint, map_hw, size, grid, points)):
            for c, hits in enumerate(row):
                inside = weights[i, :, r, c] == 1
                assert ((weights[i, :, r, c] == 0) | inside).all()
                assert cells[i, :, r, c][inside].tolist() == hits
                assert ((cells[i, :, r, c] >= 0) & (cells[i, :, r, c] < 18 * 18)).all()
                assert count[i, 0, r, c] == max(len(hits), 1)
                outside += len(hits) < points**2
    assert outside > 0


def test_bilinear_taps_reproduce_a_linear_map_and_resample_maps():
    mh, mw, size, grid = 6, 10, 96, (12, 12)
    image_wh = (320, 200)
    footprint = torch.tensor([20.0, 10.0, 300.0, 178.0])
    mappings = torch.tensor(np.stack(random_mappings(np.random.default_rng(4), image_wh, size, 6)))
    cells, weights, count = cell_taps(mappings, footprint, (mh, mw), size, grid, points=2, mode="bilinear")
    assert cells.shape == (len(mappings), 16, *grid)
    assert ((cells >= 0) & (cells < mh * mw)).all() and (weights >= 0).all()
    # per point, the weights of its four taps sum to 1 inside the footprint and 0 outside, and average the
    # cell centres to the point itself (clamped to the outer centres)
    per_point = weights.view(len(mappings), 4, 4, *grid).sum(1)
    uv, _, _ = map_coordinates(mappings, footprint, (mh, mw), size, grid, points=2)
    inside = ((uv >= 0) & (uv < torch.tensor([mw, mh]))).all(-1)
    torch.testing.assert_close(per_point, inside.double(), rtol=0, atol=1e-12)
    centres = torch.stack([cells % mw + 0.5, cells // mw + 0.5], -1).double()
    mean = (weights[..., None] * centres).view(len(mappings), 4, 4, *grid, 2).sum(1)
    want = torch.minimum(uv.clamp(min=0.5), torch.tensor([mw - 0.5, mh - 0.5], dtype=torch.float64))
    torch.testing.assert_close(mean[inside], want[inside], rtol=0, atol=1e-9)
    # and the same taps applied to random per-cell distributions give resample_maps' bilinear tokens
    probs = torch.rand(len(mappings), 3, mh, mw, dtype=torch.float64)
    dense, _ = resample_maps(probs, mappings, footprint, size, grid, points=2, mode="bilinear")
    read = probs.flatten(2).gather(2, cells.flatten(1)[:, None].expand(-1, 3, -1)).view(len(mappings), 3, 16, *grid)
    torch.testing.assert_close((read * weights[:, None]).sum(2) / count, dense, rtol=0, atol=1e-12)


def test_skipped_rows_give_invalid_tokens():
    scores = torch.full((2, 3, 4, 4), float("nan"), dtype=torch.float16)
    classes = torch.full((2, 3, 4, 4), -1, dtype=torch.int16)
    scores[0], classes[0] = torch.tensor([3.0, 2.0, 1.0])[:, None, None], torch.tensor([5, 1, 2])[:, None, None]
    probs = densify(scores, classes, 7)
    eye = torch.tensor(crop_mapping(0, 0, 64, 64, 32)).expand(2, 3, 3)
    out, valid = resample_maps(probs, eye, torch.tensor([0.0, 0, 64, 64]), 32, (2, 2))
    assert valid[0].all() and not valid[1].any()
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_warp_image_nearest_realises_the_mapping_exactly():
    # nearest sampling makes PIL's pixel convention visible: output (x, y) shows source pixel floor(M @ centre)
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    img = Image.fromarray(src)
    size = 48
    cases = [crop_mapping(10.3, 5.7, 40.1, 33.9, size),  # axis-aligned inside the image: the resize path
             crop_mapping(10.3, 5.7, 40.1, 33.9, size) @ hflip_mapping(size),
             crop_mapping(20, 10, 45, 45, size) @ rotate_mapping(33, size),  # the affine path
             crop_mapping(0, 0, 40, 40, size) @ translate_mapping(-20.5, 30.25)]  # partly outside: fill
    for m in cases:
        out = np.asarray(warp_image(img, m, size, Image.Resampling.NEAREST, (7, 8, 9)))
        ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
        px = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
        py = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
        inside = (px >= 0) & (px < 90) & (py >= 0) & (py < 70)
        far = (np.abs(px - np.round(px)) > 1e-3) & (np.abs(py - np.round(py)) > 1e-3)  # PIL: 16.16 fixed point
        want = src[np.clip(np.floor(py), 0, 69).astype(int), np.clip(np.floor(px), 0, 89).astype(int)]
        assert (out[inside & far] == want[inside & far]).all()
        assert (out[~inside & far] == (7, 8, 9)).all()


def ramp_image(width: int, height: int) -> Image.Image:
    """R = column, G = row, B = 200: an image whose pixels tell where they come from."""
    ys, xs = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 200)], -1).astype(np.uint8))


@pytest.mark.parametrize("size,patch", [(35, 7), (225, 15)])
@pytest.mark.parametrize("kind", ["train", "eval"])
def test_image_and_map_agree_through_the_full_transform(size, patch, kind):
    # odd patch sizes put each token centre on a pixel centre, so the pixel there and the token's label are
    # the same point of the original; 250x180 -> 35 shrinks (antialiased path), -> 225 enlarges
    width, height = 250, 180
    img = ramp_image(width, height)
    zeros, ones = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if kind == "train":
        t = geometric_only(LabelAwareTransform(size, auto_augment="rand-m9-mstd0.5-inc1", mean=zeros, std=ones,
                                               re_prob=0))
    else:
        t = LabelAwareEvalTransform(size, crop_pct=0.95, mean=zeros, std=ones)
    grid, map_hw = (size // patch, size // patch), (18, 18)
    footprint = center_square(width, height)
    cell = (footprint[2] - footprint[0]) / map_hw[1]
    seed_all(3)
    checked = decoded = 0
    for _ in range(12):
        x, m = t(img)
        assert x.shape == (3, size, size) and m.dtype == np.float32
        pix = x.numpy().transpose(1, 2, 0) * 255
        labels, valid = resample_maps(position_map(1, map_hw), torch.tensor(m[None]), torch.tensor(footprint),
                                      size, grid, points=1)
        shrink = np.sqrt(abs(np.linalg.det(m[:2, :2].astype(np.float64))))
        margin = 3 + 2.5 * shrink  # the resampling kernel's reach, in original pixels
        for r in range(grid[0]):
            for c in range(grid[1]):
                row, col = r * patch + patch // 2, c * patch + patch // 2  # the pixel at the token centre
                px, py = (m.astype(np.float64) @ [col + 0.5, row + 0.5, 1.0])[:2]
                if margin < px < width - margin and margin < py < height - margin:
                    # the image shows there the point the mapping predicts (ramp value j at pixel centre j+0.5),
                    # up to 8 bits: PIL's resize rounds, its affine warp truncates (centred by the + 0.5)
                    assert abs(pix[row, col, 0] + 0.5 - (px - 0.5)) <= 1.25
                    assert abs(pix[row, col, 1] + 0.5 - (py - 0.5)) <= 1.25
                    assert abs(pix[row, col, 2] - 200) <= 1.0
                    checked += 1
                    # and the map labels the token with the cell of the point the image shows
                    u, v = (pix[row, col, :2] + 1.0 - footprint[:2]) / cell
                    if 0 < u < 18 and 0 < v < 18 and min(abs(u - np.round(u)), abs(v - np.round(v))) > 0.15:
                        assert valid[0, r, c]
                        assert int(labels[0, :, r, c].argmax()) == int(v) * 18 + int(u)
                        decoded += 1
                elif px < -margin or px > width + margin or py < -margin or py > height + margin:
                    assert pix[row, col].max() <= 1.0  # the fill colour (the mean, here black)
                    assert not valid[0, r, c]
    assert checked > 50 and decoded > 20


def test_geometric_ops_match_timm():
    # timm renders each geometric op on a ramp canvas with nearest sampling, so each output pixel shows source
    # pixel floor(M @ centre) for the op's true mapping M; the mapping our routed op records must be that M
    # (rotations and translations exactly; our shears turn about the canvas centre, timm's about the corner)
    size = 128
    canvas = ramp_image(size, size)
    hparams = {"translate_const": int(size * 0.45), "img_mean": (0, 0, 0), "interpolation": Image.Resampling.NEAREST}
    timm_ops = {op.name: op for op in rand_augment_transform("rand-m7-mstd0-inc1", dict(hparams)).ops}
    ours = LabelAwareTransform(size, auto_augment="rand-m7-mstd0-inc1", interpolation="nearest")
    routed = {op.name: op for op in ours.augment.ops if op.name in GEOMETRIC_OPS}
    assert set(routed) == {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    applied = 0
    for name, op in routed.items():
        for seed in range(4):
            random.seed(seed)
            render = np.asarray(timm_ops[name](canvas)).astype(np.int64)
            random.seed(seed)
            mapping = op(_Canvas(size, np.eye(3))).mapping
            if np.array_equal(mapping, np.eye(3)):  # the op's p=0.5 draw skipped it, in both
                assert np.array_equal(render, np.asarray(canvas))
                continue
            applied += 1
            if name.startswith("Shear"):
                np.testing.assert_allclose(mapping @ [size / 2, size / 2, 1], [size / 2, size / 2, 1])
                mapping = mapping.copy()
                mapping[:2, 2] = 0
            px = mapping[0, 0] * xs + mapping[0, 1] * ys + mapping[0, 2]
            py = mapping[1, 0] * xs + mapping[1, 1] * ys + mapping[1, 2]
            inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
            clear = (np.abs(px - np.round(px)) > 0.01) & (np.abs(py - np.round(py)) > 0.01)  # PIL: fixed point
            keep = inside & clear
            assert keep.sum() > size * size / 3
            assert (render[..., 0][keep] == np.floor(px[keep])).all(), name
            assert (render[..., 1][keep] == np.floor(py[keep])).all(), name
            assert (render[..., 2][~inside & clear] == 0).all(), name
    assert applied >= 8


def block_image(rng: np.random.Generator, blocks: int, block: int) -> np.ndarray:
    palette = rng.integers(0, 256, (5, 3))
    base = palette[rng.integers(0, 5, (blocks, blocks))].repeat(block, 0).repeat(block, 1)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def shuffle_blocks(a: np.ndarray, order: np.ndarray, block: int) -> np.ndarray:
    n = a.shape[0] // block
    tiles = a.reshape(n, block, n, block, -1).transpose(0, 2, 1, 3, 4).reshape(n * n, block, block, -1)
    return tiles[order].reshape(n, n, block, block, -1).transpose(0, 2, 1, 3, 4).reshape(a.shape)


@pytest.mark.parametrize("name", sorted(set(NAME_TO_OP) - set(GEOMETRIC_OPS)))
def test_photometric_ops_do_not_move_pixels(name):
    # An op routed to the image instead of the mapping must not move content: permuting the image's blocks
    # (histogram unchanged) then applying it equals applying it then permuting, away from block edges.
    # A geometric op (rotate, shear, translate) fails this; LUT, global-statistics and local-filter ops pass.
    rng = np.random.default_rng(4)
    block, margin = 16, 6
    a = block_image(rng, 4, block)
    order = rng.permutation(16)
    op = AugmentOp(name, prob=1.0, magnitude=9, hparams={"img_mean": (128, 128, 128), "translate_const": 20})
    random.seed(0)
    first = np.asarray(op(Image.fromarray(shuffle_blocks(a, order, block))))
    random.seed(0)
    second = shuffle_blocks(np.asarray(op(Image.fromarray(a))), order, block)
    interior = (slice(None), slice(margin, block - margin), slice(None), slice(margin, block - margin))
    n = a.shape[0] // block
    assert np.array_equal(first.reshape(n, block, n, block, 3)[interior],
                          second.reshape(n, block, n, block, 3)[interior])


def test_random_erasing_and_colour_ops_leave_the_mapping_alone():
    img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    plain = LabelAwareTransform(48, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0)
    erasing = LabelAwareTransform(48, auto_augment="rand-m9-mstd0.5-inc1", re_prob=1.0)
    differs = 0
    for seed in range(8):
        seed_all(seed)
        x0, m0 = plain(img)
        seed_all(seed)
        x1, m1 = erasing(img)
        assert np.array_equal(m0, m1)
        differs += not torch.equal(x0, x1)
    assert differs == 8
    # every draw comes before any pixel work: draw() alone gives the same mapping, and the ops it records are
    # photometric ones only
    seed_all(9)
    draw = plain.draw(img)
    assert all(name not in GEOMETRIC_OPS for name, _ in draw.ops)
    seed_all(9)
    assert np.array_equal(plain(img)[1], draw.mapping)


def test_posterize_at_full_magnitude_blackens_instead_of_raising():
    img = Image.fromarray(np.random.default_rng(8).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    # 4 - int(10 / 10 * 4) = 0 bits kept: black; 4 - int(5 / 10 * 4) = 2 bits
    for config, bits, mask in (("rand-m10-inc1", 0, 0x00), ("rand-m5-inc1", 2, 0xC0)):
        op = next(op for op in LabelAwareTransform(16, auto_augment=config).augment.ops
                  if op.name == "PosterizeIncreasing")
        op.prob = 1.0
        (name, args), = op(_Canvas(16, np.eye(3))).ops  # the student transform records the op as drawn
        assert args == (bits,)
        assert np.array_equal(np.asarray(PIL_OPS[name](img, *args)), np.asarray(img) & mask)
    # the labeler's timm transform takes the same fix
    plain = safe_posterize(create_transform(16, is_training=True, auto_augment="rand-m10-inc1"))
    op = next(op for t in plain.transforms for op in getattr(t, "ops", []) if op.name == "PosterizeIncreasing")
    op.prob = 1.0
    assert not np.asarray(op(img)).any()


def test_transform_pickles_and_replays():
    t = LabelAwareTransform(32)
    img = Image.fromarray(np.random.default_rng(6).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    clone = pickle.loads(pickle.dumps(t))
    seed_all(7)
    x0, m0 = t(img)
    seed_all(7)
    x1, m1 = clone(img)
    assert torch.equal(x0, x1) and np.array_equal(m0, m1)


def test_eval_mapping_is_the_centre_square():
    _, m = LabelAwareEvalTransform(64, crop_pct=1.0)(Image.new("RGB", (300, 200)))
    corners = m.astype(np.float64) @ np.array([[0, 64], [0, 64], [1, 1]])
    np.testing.assert_allclose(corners[:2].T.ravel(), [50, 0, 250, 200], atol=1e-4)
