"""--augment-on device against the PIL path: the same draws and token targets, images within the stated tolerance,
photometric ops and erasing as PIL and timm do them, mixed formats and sizes, corrupt bytes, a training run."""

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data.auto_augment import LEVEL_TO_ARG
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader

from common.errors import UserError
from core.checkpoint import save_checkpoint
from core.imaging.device import warp_images
from core.imaging.mappings import resize_box
from core.imaging.pil import RESAMPLE, warp_image
from core.seeding import seed_all
from shards.build import build
from shards.demo import build_demo
from shards.manifest import content_digest, load_manifest
from shards.reader import ShardReader, split_keys
from train.augment import PIL_OPS, LabelAwareTransform, _erase_boxes
from train.data import StudentData, token_label_targets
from train.device_augment import DeviceAugment
from train.photometric import OP_NAMES, TENSOR_OPS, apply_ops
from train.student import Run, build_parser, check_args, main

K = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random colour field with grain: structure at every scale, like a small photograph."""
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    return np.clip(np.asarray(coarse, np.float32) + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def levels(x: torch.Tensor, t: LabelAwareTransform) -> torch.Tensor:
    """A normalised batch back in 0..255 levels."""
    mean, std = torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)
    return (x * std + mean) * 255


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, lvvit_store) -> tuple[Path, Path]:
    """Demo shards (train: 24 in shards of 8) and a store of random top-3 8x8 maps for 64 px inputs."""
    root = tmp_path_factory.mktemp("data") / "demo"
    build_demo(root, train=24, val=8, per_shard=8)
    rng = np.random.default_rng(0)

    def maps(row: int, key: str) -> np.ndarray:
        scores = -np.sort(-rng.normal(0, 2, (3, 8, 8)), axis=0)
        classes = np.stack([rng.permutation(K)[:3] for _ in range(64)], 1).reshape(3, 8, 8)
        return np.stack([scores, classes])

    return root, lvvit_store(root, maps, 64)


def both_modes(root: Path, store: Path | None, transform: LabelAwareTransform, **kwargs) -> list[tuple[dict, dict]]:
    """Every batch of one epoch from the PIL path and from the device path (rendered on the CPU), side by side."""
    out = []
    pil, device = (StudentData(root, store, transform, seed=5, augment_on=mode, **kwargs)
                   for mode in ("workers", "device"))
    stage = device.device_stage("cpu")
    for data in (pil, device):
        data.set_epoch(1)
    pil_batches = DataLoader(pil, batch_size=8, num_workers=2)
    device_batches = stage.batches(DataLoader(device, batch_size=8, num_workers=2, collate_fn=device.collate))
    for a, b in zip(pil_batches, device_batches, strict=True):
        out.append((a, b))
    return out


def test_the_same_seeds_give_the_same_mappings_and_token_targets(dataset):
    root, store = dataset
    transform = LabelAwareTransform(64)  # the trainer's defaults: crop, flip, RandAugment m9, erasing 0.25
    for pil, device in both_modes(root, store, transform):
        for name in ("index", "cls", "mapping", "footprint", "scores", "classes"):
            assert torch.equal(pil[name], device[name]), name
        assert device["image"].shape == pil["image"].shape and device["image"].dtype == torch.float32
        for kind in ("gumbel", "softmax"):
            targets = [token_label_targets(b, K, 64, (8, 8), kind=kind, points=2,
                                           generator=torch.Generator().manual_seed(3)) for b in (pil, device)]
            (tok_a, valid_a, pooled_a), (tok_b, valid_b, pooled_b) = targets
            assert torch.equal(valid_a, valid_b) and torch.equal(pooled_a, pooled_b)
            if kind == "gumbel":
                assert torch.equal(tok_a.index, tok_b.index) and torch.equal(tok_a.weight, tok_b.weight)
            else:
                assert torch.equal(tok_a, tok_b)


def test_the_device_path_draws_what_the_pil_path_draws(dataset):
    # the device batch carries each sample's draw: the same as the PIL path's draw under the sample's seed
    root, _ = dataset
    transform = LabelAwareTransform(64, interpolation="random", re_prob=0.9, re_count=2)
    data = StudentData(root, None, transform, seed=5, augment_on="device")
    data.set_epoch(1)
    pil_images = {s["index"]: s["image"] for s in ShardReader(root, "train")}
    checked = 0
    for batch in DataLoader(data, batch_size=8, collate_fn=data.collate):
        for i, row in enumerate(batch["index"].tolist()):
            seed_all(5, 1, row)  # core.data.SeededTransform's seed of this sample
            draw = transform.draw(pil_images[row])
            assert np.array_equal(batch["mapping"][i].numpy(), draw.mapping)
            names = [OP_NAMES[c] for c in batch["ops"][i].tolist() if c >= 0]
            assert names == [name for name, _ in draw.ops]
            assert np.allclose(batch["args"][i][:len(names)].numpy(), [a[0] if a else 0.0 for _, a in draw.ops])
            boxes = [tuple(b) for b in batch["erase"][i].tolist() if b[2] > 0]
            assert boxes == list(draw.erase)
            checked += 1
    assert checked == 24


def test_images_agree_with_the_pil_path_within_the_interpolation_tolerance(dataset):
    # The tolerance, in 0..255 levels, with the trainer's RandAugment and no erasing (its noise is drawn apart).
    # Crops and flips (most samples) are PIL's resize up to its fixed-point rounding; rotations, shears and
    # translations out of the image go through grid_sample, whose bicubic kernel (a = -0.75) is not PIL's
    # (a = -0.5): a few levels at edges (test_warp_matches_pil_per_path). The photometric ops are PIL's exactly,
    # but they pass on what the warp changed, and a threshold op (Solarize, Posterize) turns a pixel one level off
    # at its threshold into one up to 255 levels off. Measured on 256 demo images: mean 0.14 levels, 99th
    # percentile 2, 2.0% of values more than one level off; without RandAugment: mean 0.0003, at most 1.
    root, store = dataset
    transform = LabelAwareTransform(64, re_prob=0.0)
    diffs = torch.cat([(levels(a["image"], transform) - levels(b["image"], transform)).abs().flatten()
                       for a, b in both_modes(root, store, transform)])
    stats = float(diffs.mean()), float(torch.quantile(diffs, 0.99)), float((diffs > 1.01).float().mean())
    assert stats[0] < 0.3 and stats[1] <= 3 and stats[2] < 0.04, stats
    plain = LabelAwareTransform(64, auto_augment=None, color_jitter=None, re_prob=0.0)
    diffs = torch.cat([(levels(a["image"], plain) - levels(b["image"], plain)).abs().flatten()
                       for a, b in both_modes(root, store, plain)])
    assert diffs.max() < 1.01 and diffs.mean() < 0.01


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_warp_matches_pil_per_path(interpolation):
    # one batch of photos of mixed sizes through mappings the trainer draws (rotations and shears at every layer
    # for half of them), against warp_image one by one
    rng = np.random.default_rng(1)
    sizes = [(500, 375), (375, 500), (320, 256), (96, 80), (640, 480), (200, 150)]
    pictures = [photo(rng, w, h) for w, h in sizes]
    t = LabelAwareTransform(112, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0)
    mappings = []
    for seed in range(36):
        seed_all(seed)
        mappings.append(t.draw(Image.fromarray(pictures[seed % 6])).mapping)
    images = [torch.from_numpy(pictures[i % 6].copy()).permute(2, 0, 1) for i in range(36)]
    got = warp_images(images, np.stack(mappings), 112, [interpolation] * 36, t.fill)
    stats = {"resize": [], "warp": []}
    for i, m in enumerate(mappings):
        want = np.asarray(warp_image(Image.fromarray(pictures[i % 6]), m, 112, RESAMPLE[interpolation], t.fill))
        diff = np.abs(got[i].permute(1, 2, 0).numpy() - want)
        h, w = pictures[i % 6].shape[:2]
        path = "resize" if resize_box(m.astype(np.float64), w, h, 112, 112) is not None else "warp"
        stats[path].append(diff)
    assert len(stats["resize"]) >= 10 and len(stats["warp"]) >= 5
    resize, warp = (np.stack(stats[path]) for path in ("resize", "warp"))
    if interpolation == "nearest":  # the same pixel, but for points exactly on a pixel edge (PIL rounds its steps)
        assert (resize > 0).mean() < 0.03 and (warp > 0).mean() < 0.03
        return
    assert resize.max() <= 2 and resize.mean() < 0.02  # PIL's fixed-point rounding only (one level per pass)
    if interpolation == "bilinear":
        assert warp.max() <= 2 and warp.mean() < 0.02  # the same kernel
    else:
        assert warp.max() <= 6 and warp.mean() < 0.5  # Keys a = -0.75 against PIL's -0.5


@pytest.mark.parametrize("name", sorted(TENSOR_OPS))
def test_photometric_ops_equal_pil(name):
    # a batch with the op drawn at several magnitudes (and, in a second slot, on some images only), against PIL
    rng = np.random.default_rng(2)
    pictures = [photo(rng, 40, 30), rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
                np.full((30, 40, 3), 77, np.uint8), (photo(rng, 40, 30) // 4 + 100).astype(np.uint8)]
    level = LEVEL_TO_ARG[name]
    random.seed(0)
    args = [level(m, {"translate_const": 10}) if level else () for m in (0, 4, 7, 10)]
    x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float()
    codes = np.array([[OP_NAMES.index(name), OP_NAMES.index(name) if i % 2 else -1] for i in range(4)])
    values = np.array([[a[0] if a else 0.0] * 2 for a in args])
    got = apply_ops(x, codes, values)
    for i, (picture, a) in enumerate(zip(pictures, args)):
        want = PIL_OPS[name](Image.fromarray(picture), *a)
        if i % 2:
            want = PIL_OPS[name](want, *a)
        assert np.array_equal(got[i].permute(1, 2, 0).numpy(), np.asarray(want)), (name, a)


@pytest.mark.parametrize("mode, count", [("pixel", 1), ("rand", 3), ("const", 2)])
def test_erasing_draws_timms_boxes_and_fills_them_in_kind(mode, count):
    t = LabelAwareTransform(48, re_prob=0.8, re_mode=mode, re_count=count)
    timm_erase = RandomErasing(0.8, mode=mode, max_count=count, device="cpu")
    erased = 0
    for seed in range(30):
        seed_all(seed)
        boxes = _erase_boxes(t.erase, 48, 48)
        seed_all(seed)
        image = torch.full((3, 48, 48), 100.0)
        timm_erase(image)
        mask = np.zeros((48, 48), bool)
        for top, left, h, w in boxes:
            mask[top:top + h, left:left + w] = True
        assert np.array_equal((image != 100).any(0).numpy(), mask)
        erased += bool(boxes)
    assert erased > 15
    # on the device: the same boxes, filled with noise of the same kind (pixel: N(0, 1) per pixel)
    data_boxes = np.zeros((2, count, 4), np.int64)
    data_boxes[0, 0] = (4, 6, 30, 20)
    stage = DeviceAugment(t, torch.device("cpu"), shard_of=lambda row: Path())
    x = stage.erase(torch.full((2, 3, 48, 48), 100.0), data_boxes, [1, 2])
    region = x[0, :, 4:34, 6:26]
    assert (x[1] == 100).all() and (x[0, :, :4] == 100).all() and not (region == 100).any()
    if mode == "pixel":
        assert abs(float(region.mean())) < 0.15 and abs(float(region.std()) - 1) < 0.1
    elif mode == "rand":
        assert (region == region[:, :1, :1]).all()
    else:
        assert (region == 0).all()


def replace_member(shard: Path, name: str, data: bytes) -> None:
    """Rewrite one tar member's bytes, keeping the tar valid and its manifest entry in step (the reader would
    otherwise refuse the changed tar as a whole, before the device decodes the bad sample)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, old in members:
            if member.name == name:
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data if member.name == name else old))
    doc = json.loads((shard.parent / "manifest.json").read_text())
    for split in doc["splits"].values():
        for entry in split["shards"]:
            if entry["file"] == shard.name:
                entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
        split["content_digest"] = content_digest(split["shards"])
    (shard.parent / "manifest.json").write_text(json.dumps(doc))


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Shards of JPEGs (RGB, greyscale, CMYK) and PNGs of different sizes: train 2 classes x 6, val 2 x 1."""
    rng = np.random.default_rng(3)
    for split, count in (("train", 6), ("val", 1)):
        for c in ("a", "b"):
            (tmp_path / "folder" / split / c).mkdir(parents=True)
            for i in range(count):
                image = Image.fromarray(photo(rng, 60 + 13 * i, 90 - 7 * i))
                image, fmt = [(image, "JPEG"), (image.convert("L"), "JPEG"), (image.convert("CMYK"), "JPEG"),
                              (image, "PNG")][i % 4]
                image.save(tmp_path / "folder" / split / c / f"{c}{i}.{'png' if fmt == 'PNG' else 'jpg'}", fmt)
    build(tmp_path / "folder", tmp_path / "shards", 6, seed=0, overwrite=False)
    return tmp_path / "shards"


def test_mixed_formats_and_sizes_in_one_batch(mixed):
    # colour jitter's ops, and a filter drawn per sample: bilinear and bicubic in one batch
    transform = LabelAwareTransform(48, auto_augment=None, color_jitter=0.4, re_prob=0.0, interpolation="random")
    for pil, device in both_modes(mixed, None, transform):
        assert torch.equal(pil["mapping"], device["mapping"])
        diff = (levels(pil["image"], transform) - levels(device["image"], transform)).abs()
        assert diff.mean() < 0.2 and diff.max() <= 12


def device_rows(data: StudentData, workers: int = 0) -> list[int]:
    """The rows of one epoch through the device path (on the CPU)."""
    stage = data.device_stage("cpu")
    loader = DataLoader(data, batch_size=4, num_workers=workers, collate_fn=data.collate)
    return [int(i) for batch in stage.batches(loader) for i in batch["index"]], stage


def test_corrupt_bytes_name_shard_and_key_and_can_be_skipped(mixed, capsys):
    manifest = load_manifest(mixed)
    keys = split_keys(mixed, "train")
    key = next(k for k in keys if k.endswith(("0", "4")))  # an RGB JPEG: decoded on the device
    shard = mixed / manifest.shards("train")[keys.index(key) // 6][0]
    good = next((mixed.parent / "folder" / "train").glob(f"*/{Path(key).name}.jpg")).read_bytes()
    replace_member(shard, f"{key}.jpg", good[: len(good) // 2])  # the header reads, the body is cut
    transform = LabelAwareTransform(48, re_prob=0.0)
    with pytest.raises(UserError, match=f"{shard}: {key}: cannot decode its image \\(RuntimeError\\); rebuild "):
        device_rows(StudentData(mixed, None, transform, augment_on="device"), workers=2)
    rows, stage = device_rows(StudentData(mixed, None, transform, augment_on="device", on_error="skip"))
    assert len(rows) == 11 and stage.skips.skipped[0][:2] == (str(shard), key)
    assert f"warning: skipped {shard}: {key}: cannot decode its image" in capsys.readouterr().err
    replace_member(shard, f"{key}.jpg", b"not an image" * 10)  # refused in the worker, as the PIL path refuses it
    with pytest.raises(UserError, match=f"{shard}: {key}: cannot decode its .jpg or .cls"):
        device_rows(StudentData(mixed, None, transform, augment_on="device"))
    rows, _ = device_rows(StudentData(mixed, None, transform, augment_on="device", on_error="skip"))
    assert len(rows) == 11


def test_a_student_trains_with_augment_on_device(dataset, tmp_path, capsys):
    _, store = dataset
    flags = ["--labels", str(store), "--model", "fan_demo_tiny_p8", "--epochs", "2", "--batch-size", "8",
             "--workers", "1", "--final-corruptions", "none", "--out", str(tmp_path / "run")]
    main([*flags, "--augment-on", "device", "--stop-after", "1"])
    # a run refuses to resume in the other mode (the views differ by interpolation), then resumes in its own
    with pytest.raises(SystemExit):
        main([*flags, "--augment-on", "workers"])
    assert "trained with --augment-on device, this run has workers" in capsys.readouterr().err
    main([*flags, "--augment-on", "device"])
    assert (tmp_path / "run" / "eval.json").is_file()
    # the online labeler's clean view is rendered on the device too: without photometric ops, the student's view
    torch.manual_seed(1)
    labeler = tmp_path / "labeler.pt"
    model = timm.create_model("fan_demo_tiny_p8", num_classes=K)
    save_checkpoint(labeler, model_name="fan_demo_tiny_p8", num_classes=K, img_size=64, model=model, ema=model)
    args = build_parser().parse_args([*flags[:-1], str(tmp_path / "online"), "--augment-on", "device", "--aa", "none",
                                      "--color-jitter", "0", "--reprob", "0", "--online-labeler", str(labeler)])
    check_args(args)
    batch = next(iter(Run(args).loader()))
    assert torch.equal(batch["clean"], batch["image"])
