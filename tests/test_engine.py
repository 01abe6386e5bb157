"""The engine both trainers share: one eval view, full batches on every rank, host reads only at log points, layering."""

import argparse
import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, get_worker_info

from common.errors import UserError
from core.data import TrainSplit, deal, steps_per_epoch
from core.engine import train_one_epoch
from core.eval_data import EvalTransform
from core.imaging.boxes import centre_box, fill_colour
from core.imaging.pil import labeler_input
from core.optim import Optimization
from dump.store.schema import footprint_box, make_footprint
from shards.build import build
from shards.demo import build_demo
from shards.reader import ShardReader, decode_sample
from train.augment import LabelAwareEvalTransform, LabelAwareTransform

REPO = Path(__file__).resolve().parents[1]
# package -> the packages of this repository it may import (no cycles: each only imports those below it)
ORDER = ("common", "shards", "core", "labeler", "dump", "train", "pipeline")
LAYERS = {package: set(ORDER[:i]) for i, package in enumerate(ORDER)}
# all that train takes from dump: the store and its reader API (pixels and boxes are core.imaging's, below both)
TRAIN_FROM_DUMP = {("dump.store.reader", "LabelStore"), ("dump.store.reader", "SHARDS_HELP"),
                   ("dump.store.reader", "open_store"), ("dump.store.reader", "store_shards"),
                   ("dump.store.checks", "check_matches"), ("dump.store.schema", "footprint_box")}


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_every_eval_view_is_the_same_centre_square(crop_pct):
    """The dump's labeler input, the evaluation's view and the students' eval view with its mapping: one rule."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))
    size, zeros, ones = 48, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    pixels = labeler_input(image, footprint_box(make_footprint(size, crop_pct), 150, 90), size)
    dumped = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
    evaluated = EvalTransform(size, crop_pct=crop_pct, mean=zeros, std=ones)({"image": image, "cls": 0})["image"]
    student, mapping = LabelAwareEvalTransform(size, crop_pct=crop_pct, mean=zeros, std=ones)(image)
    torch.testing.assert_close(evaluated, dumped, rtol=0, atol=1e-6)
    torch.testing.assert_close(student, dumped, rtol=0, atol=1e-6)
    side = crop_pct * 90
    box = ((150 - side) / 2, (90 - side) / 2, (150 + side) / 2, (90 + side) / 2)
    assert centre_box(150, 90, crop_pct) == footprint_box(make_footprint(size, crop_pct), 150, 90) == box
    corners = mapping.astype(np.float64) @ np.array([[0, size], [0, size], [1, 1]])
    np.testing.assert_allclose(corners[:2].T.ravel(), box, atol=1e-4)
    mean = (0.5, 0.2, 1.0)  # one fill beyond the image (the dump's is fill_colour's): 127.5 rounds to even
    fills = EvalTransform(8, mean=mean).fill, LabelAwareTransform(8, mean=mean).fill, fill_colour(mean)
    assert fills == ((128, 51, 255),) * 3


def test_every_rank_gets_the_full_batches_of_every_epoch(tmp_path):
    """Uneven shards (7, 7, 7, 7, 3): the step count holds for every rank of every epoch's shuffled deal, whether
    the rank batches its samples itself or each DataLoader worker batches its own shards (and drops its rest)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 31), ("val", 1)):
        for i in range(count):
            (tmp_path / "folder" / split / "a").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "folder" / split / "a" / f"{i}.png")
    build(tmp_path / "folder", tmp_path / "shards", per_shard=7, seed=0, overwrite=False)
    data = ShardReader(tmp_path / "shards", "train", shuffle=True, seed=3)
    for world, batch in ((1, 4), (2, 5), (3, 3), (4, 2)):
        least = min(len(at_epoch(tmp_path / "shards", rank, world, epoch))
                    for rank in range(world) for epoch in range(20))
        assert steps_per_epoch(data, batch, world) == least // batch, (world, batch)
    for world, batch, workers in ((1, 4, 2), (1, 7, 2), (1, 3, 4), (2, 4, 2), (2, 3, 8)):
        counts = [[sum(n for _, n in shards[w::min(workers, len(shards))]) for w in range(min(workers, len(shards)))]
                  for shards in (at_epoch(tmp_path / "shards", rank, world, epoch).rank_shards()
                                 for rank in range(world) for epoch in range(20))]
        least = min(sum(n // batch for n in per_worker) for per_worker in counts)
        assert 0 < steps_per_epoch(data, batch, world, workers=workers) <= least, (world, batch, workers)
    # 5 shards on 2 workers: 3 and 2 shards, at least 3 + 7 + 7 and 3 + 7 images: 17 // 4 + 10 // 4 batches
    assert steps_per_epoch(data, 4, 1, workers=2) == 6
    assert steps_per_epoch(data, 4, 1, cap=2) == 2


class CountingDecode:
    """decode_sample that tags each sample with how many samples this process has decoded so far."""

    def __init__(self):
        self.decoded = 0

    def __call__(self, raw: dict) -> dict:
        self.decoded += 1
        return {**decode_sample(raw), "decoded": self.decoded}


def stream_tag(sample: dict) -> tuple[int, int, int]:
    return sample["index"], get_worker_info().id, sample["decoded"]


def test_one_shard_is_split_by_sample_over_two_ranks_of_two_workers(tmp_path):
    """30 images in one shard, 2 ranks x 2 DataLoader workers, batch 4: every sample of each epoch is read by
    exactly one of the 4 streams, which decodes only its own; each rank gets the 3 batches steps_per_epoch
    counts; the deal changes with the epoch. Rows are dealt in blocks of the batch, so a rank drops one partial
    batch at most."""
    build_demo(tmp_path / "one", train=30, val=2, per_shard=30)
    ranks = [TrainSplit(tmp_path / "one", stream_tag, seed=3, rank=rank, world_size=2, decode=CountingDecode())
             for rank in (0, 1)]
    for data in ranks:
        deal(data, 4, 2, 2)
        assert data.split_samples == 4 and steps_per_epoch(data, 4, 2, workers=2) == 3  # 15 rows a rank
    partitions = []
    for epoch in (0, 1):
        streams: dict[tuple[int, int], list[int]] = {}
        for rank, data in enumerate(ranks):
            data.set_epoch(epoch)
            assert len(data) == 15
            decoded = {}
            for index, worker, count in DataLoader(data, batch_size=None, num_workers=2):
                streams.setdefault((rank, worker), []).append(index)
                decoded[worker] = max(decoded.get(worker, 0), count)
            assert decoded == {w: len(streams[rank, w]) for w in (0, 1)}  # a stream decodes only what it yields
            batches = list(DataLoader(data, batch_size=4, num_workers=2, drop_last=True, collate_fn=list))
            assert len(batches) == 3
        assert len(streams) == 4 and sorted(sum(streams.values(), [])) == list(range(30))
        assert sorted(len(rows) for rows in streams.values()) == [7, 7, 8, 8]
        partitions.append({rank_worker: sorted(rows) for rank_worker, rows in streams.items()})
    assert partitions[0] != partitions[1]
    deal(ranks[0], 16, 2, 2)
    with pytest.raises(UserError, match=r"one: 30 train images over 2 rank\(s\) leave a rank no full batch: fewer "
                                        r"than --batch-size 16 images; lower the batch size$"):
        steps_per_epoch(ranks[0], 16, 2, workers=2)


def test_many_shards_are_dealt_whole(tmp_path):
    """Enough shards for every stream, each giving its full batches: whole shards, each tar read once an epoch;
    a short shard that would cost more than a tenth of the steps: split samples."""
    build_demo(tmp_path / "even", train=64, val=2, per_shard=8)  # 8 shards of 8
    data = TrainSplit(tmp_path / "even", stream_tag, rank=0, world_size=2)
    deal(data, 4, 2, 2)
    assert data.split_samples is None and steps_per_epoch(data, 4, 2, workers=2) == 8
    deal(data, 4, 2, 3)  # 8 shards for 6 streams, 8 steps either way
    assert data.split_samples is None
    deal(data, 4, 4, 2)  # 8 shards for 8 streams
    assert data.split_samples is None
    deal(data, 4, 4, 3)  # 12 streams: workers would idle
    assert data.split_samples == 4
    build_demo(tmp_path / "short", train=36, val=2, per_shard=16)  # 16, 16, 4: a rank may get the shard of 4
    data = TrainSplit(tmp_path / "short", stream_tag, rank=0, world_size=2)
    deal(data, 4, 2, 0)
    assert data.split_samples == 4 and steps_per_epoch(data, 4, 2) == 4  # whole shards: 1 step for a rank


def at_epoch(root: Path, rank: int, world: int, epoch: int) -> ShardReader:
    reader = ShardReader(root, "train", shuffle=True, seed=3, rank=rank, world_size=world)
    reader.set_epoch(epoch)
    return reader


def objective_of(model: nn.Module, poison_step: int | None = None):
    """A least-squares objective whose loss turns NaN at `poison_step`."""

    def objective(batch, epoch, step):
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        if step == poison_step:
            loss = loss * float("nan")
        return loss, {"half": (loss / 2).detach()}

    return objective


def training(log_interval: int, poison_step: int | None = None, taken: list[int] | None = None
             ) -> tuple[dict, nn.Module]:
    """Ten SGD steps of a linear least-squares model; the steps run are appended to `taken`."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    args = argparse.Namespace(opt="sgd", lr=0.1, weight_decay=0.0, epochs=1, warmup_epochs=0, warmup_lr=0.0,
                              min_lr=0.1, ema_decay=0.9, amp="off", clip_grad=None)
    optim = Optimization(model, args, 10, torch.device("cpu"))
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1), "cls": torch.zeros(4)} for _ in range(10)]
    taken = [] if taken is None else taken

    def objective(batch, epoch, step):
        taken.append(step)
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        loss = loss * float("nan") if step == poison_step else loss
        return loss, {"half": (loss / 2).detach()}

    metrics, step = train_one_epoch(objective, optim, batches, epoch=0, step=0, steps=10, log_interval=log_interval,
                                    show=False)
    assert step == 10 and taken == list(range(10))
    return {k: v for k, v in metrics.items() if k not in ("train_time", "train_samples_per_s")}, model


def test_log_interval_reads_the_losses_only_at_its_points():
    reference, model = training(log_interval=1)
    assert reference["train_samples"] == 40 and reference["world_size"] == 1
    assert reference["train_loss_half"] == pytest.approx(reference["train_loss"] / 2)
    for interval in (3, 100):
        metrics, other = training(log_interval=interval)
        assert metrics == reference and torch.equal(other.weight, model.weight)
    # a NaN loss at step index 4 is seen at the first read after it: step 6 with interval 3, at once with 1
    for interval, last in ((3, 6), (1, 5)):
        taken = []
        with pytest.raises(FloatingPointError, match=rf"loss is nan over steps {last - interval + 1}-{last} of epoch 1"):
            training(interval, poison_step=4, taken=taken)
        assert len(taken) == last


def imports_of(path: Path) -> set[tuple[str, str]]:
    """(module, name) of every import at any depth of a file's code (name "" for `import module`)."""
    pairs = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            pairs |= {(alias.name, "") for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            pairs |= {(node.module, alias.name) for alias in node.names}
    return pairs


@pytest.mark.parametrize("package", LAYERS)
def test_packages_import_only_the_layers_below_them(package):
    """common <- shards <- core <- labeler <- dump <- train <- pipeline: no import cycle between the packages."""
    for path in sorted((REPO / package).rglob("*.py")):  # subpackages too: core/imaging/*.py belong to core
        ours = {module.split(".")[0] for module, _ in imports_of(path)} & set(LAYERS)
        assert ours <= LAYERS[package] | {package}, f"{path.relative_to(REPO)} imports {sorted(ours - LAYERS[package] - {package})}"


def test_train_imports_from_dump_only_the_store_api():
    for path in sorted((REPO / "train").rglob("*.py")):
        taken = {(module, name) for module, name in imports_of(path) if module.split(".")[0] == "dump"}
        assert taken <= TRAIN_FROM_DUMP, f"{path.relative_to(REPO)} imports {sorted(taken - TRAIN_FROM_DUMP)}"
