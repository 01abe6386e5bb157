"""The label-aware data path: join by key, refusals, worker independence, maps following the image."""

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, get_worker_info

from common.errors import UserError
from core.data import deal
from dump.lvvit import import_lvvit
from dump.store.reader import open_store
from shards.demo import build_demo
from shards.manifest import load_manifest
from shards.reader import ShardReader, split_keys
from train.augment import LabelAwareTransform
from train.data import StoreJoin, StudentData, resolve_labels, token_label_targets

GRID = 8
K = 10


def row_map(row: int) -> np.ndarray:
    """LV-ViT's [2, k=2, H, W] float16 file for one row: top-1 class = row % K; its score encodes the cell."""
    cells = np.arange(GRID * GRID, dtype=np.float32).reshape(GRID, GRID)
    scores = np.stack([1.0 + cells / 8, np.zeros_like(cells)])
    classes = np.stack([np.full_like(cells, row % K), np.full_like(cells, (row + 1) % K)])
    return np.stack([scores, classes]).astype(np.float16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data") / "demo"
    build_demo(root, train=24, val=4, per_shard=8)
    files = tmp_path_factory.mktemp("lvvit")
    for row, key in enumerate(split_keys(root, "train")):
        (files / key).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(row_map(row)), files / f"{key}.pt")
    store = root / "labels" / "rows.zarr"
    import_lvvit(files, store, root, input_size=64)
    return root, store


def plain(**kw) -> LabelAwareTransform:
    return LabelAwareTransform(64, auto_augment=None, color_jitter=None, re_prob=0.0, **kw)


def test_rows_join_by_key_and_workers_do_not_change_samples(dataset):
    root, store = dataset
    data = StudentData(root, store, plain(), seed=5)
    data.set_epoch(1)
    keys = split_keys(root, "train")
    by_worker = {}
    for workers in (0, 2):
        samples = {}
        for batch in DataLoader(data, batch_size=4, num_workers=workers):
            for i, index in enumerate(batch["index"].tolist()):
                samples[index] = {k: v[i] for k, v in batch.items()}
        by_worker[workers] = samples
    assert sorted(by_worker[0]) == list(range(len(keys)))
    for index, sample in by_worker[0].items():
        assert int(sample["classes"][0, 0, 0]) == index % K  # the row of this sample's key
        other = by_worker[2][index]
        for name in ("image", "mapping", "scores", "classes", "footprint"):
            assert torch.equal(sample[name], other[name]), (index, name)


def samples_by_row(data: StudentData, workers: int) -> dict[int, dict[str, torch.Tensor]]:
    samples = {}
    for batch in DataLoader(data, batch_size=4, num_workers=workers):
        for i, index in enumerate(batch["index"].tolist()):
            samples[index] = {k: v[i] for k, v in batch.items()}
    return samples


class CountingJoin(StoreJoin):
    """StoreJoin that tags each sample with how many chunks this process has read from the store so far."""

    reads = 0

    def __call__(self, sample: dict) -> dict:
        rows = self.rows
        sample = super().__call__(sample)
        self.reads += self.rows != rows
        return {**sample, "reads": self.reads}


def test_samples_split_within_shards_join_their_rows_and_look_the_same(dataset):
    """3 shards for 2 ranks x 2 workers: samples are split within shards; each stream joins its rows with the
    store (one chunk per shard) and each sample is augmented as whole-shard dealing in one process augments it."""
    root, store = dataset
    whole = StudentData(root, store, plain(), seed=5)
    whole.set_epoch(1)
    reference = samples_by_row(whole, 0)
    split = {}
    for rank in (0, 1):
        data = StudentData(root, store, plain(), seed=5, rank=rank, world_size=2)
        deal(data, 4, 2, 2)
        assert data.split_samples == 4
        data.set_epoch(1)
        mine = samples_by_row(data, 2)
        assert len(mine) == len(data) == 12 and not mine.keys() & split.keys()
        split |= mine
    assert sorted(split) == sorted(reference) == list(range(24))
    join = CountingJoin(open_store(store), load_manifest(root).offsets("train"))
    reader = ShardReader(root, "train", shuffle=True, rank=1, world_size=2, split_samples=4, annotate=join,
                         transform=lambda sample: (get_worker_info().id, sample["index"], sample["reads"]))
    reads, shards = {}, {}
    for worker, index, count in DataLoader(reader, batch_size=None, num_workers=2):
        reads[worker] = max(reads.get(worker, 0), count)
        shards.setdefault(worker, set()).add(index // 8)
    assert reads == {worker: len(held) for worker, held in shards.items()}  # one chunk read per shard it holds rows of
    for index, sample in split.items():
        assert int(sample["classes"][0, 0, 0]) == index % K  # the row of this sample's key
        for name in ("image", "mapping", "scores", "classes", "footprint"):
            assert torch.equal(sample[name], reference[index][name]), (index, name)


def test_targets_follow_flips_through_the_loader(dataset):
    root, store = dataset
    data = StudentData(root, store, plain(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.5), seed=0)
    batch = next(iter(DataLoader(data, batch_size=16)))
    targets, valid, _ = token_label_targets(batch, K, 64, (GRID, GRID), kind="softmax", smoothing=0.0, points=1)
    assert valid.all()
    flipped = batch["mapping"][:, 0, 0] < 0
    assert 0 < int(flipped.sum()) < 16  # both cases present
    for b in range(16):
        stored = torch.from_numpy(row_map(int(batch["index"][b]))[0, 0].astype(np.float32))
        expected = torch.sigmoid(stored.flip(1) if flipped[b] else stored)  # softmax over the 2 stored logits
        assert torch.allclose(targets[b, int(batch["index"][b]) % K], expected, atol=1e-3)


def test_refusals(dataset, tmp_path):
    root, store = dataset
    assert resolve_labels(root) == (root, store)
    (root / "labels" / "other.zarr").mkdir()
    with pytest.raises(UserError, match="holds 2 stores \\(other.zarr, rows.zarr\\); pass one"):
        resolve_labels(root)
    (root / "labels" / "other.zarr").rmdir()

    zarr.open_group(store, mode="r+").attrs["complete"] = False
    with pytest.raises(UserError, match="incomplete label store"):
        StudentData(root, store, plain())
    zarr.open_group(store, mode="r+").attrs["complete"] = True

    smaller = tmp_path / "smaller"
    build_demo(smaller, train=20, val=4, per_shard=8)
    (smaller / "labels").mkdir()
    with pytest.raises(UserError, match=r"made from other shards .*24 keys stored, 20 in the shards"):
        StudentData(smaller, store, plain())
