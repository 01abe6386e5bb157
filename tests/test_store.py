"""The label store on its own: geometry, chunk layout, the read side, refusals and the writer lock (no Ray)."""

import dataclasses
import pickle
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

from common.errors import UserError
from dump.show import show
from dump.store.checks import check_matches
from dump.store.reader import LabelStore, open_store, store_shards
from dump.store.schema import (
    chunk_rows,
    create_store,
    dataset_attrs,
    footprint_box,
    identity_differences,
    make_footprint,
    store_attrs,
)
from dump.store.write import store_lock
from dump.verify import main as verify_main
from dump.verify import verify_store
from shards.demo import build_demo
from shards.manifest import Manifest, load_manifest
from shards.reader import split_keys

K, GRID = 3, (2, 3)


def random_maps(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid maps: scores descending along k, k distinct class ids per token."""
    scores = -np.sort(-rng.normal(size=(n, K, *GRID)), axis=1).astype(np.float16)
    classes = np.argsort(rng.random((n, num_classes, *GRID)), axis=1)[:, :K].astype(np.int16)
    return scores, classes


@pytest.fixture
def store(demo_shards, tmp_path, make_store):
    """A complete store with random valid maps for every key of the demo's train split."""
    manifest = load_manifest(demo_shards)
    maps = random_maps(np.random.default_rng(0), manifest.count("train"), manifest.num_classes)
    make_store(tmp_path / "labels.zarr", manifest, *maps, split_keys(demo_shards, "train"))
    return open_store(tmp_path / "labels.zarr")


def test_footprint_box_is_the_centred_square_of_the_shorter_side():
    assert footprint_box(make_footprint(224), 64, 64) == (0, 0, 64, 64)
    assert footprint_box(make_footprint(224), 100, 60) == (20, 0, 80, 60)
    assert footprint_box(make_footprint(224), 60, 100) == (0, 20, 60, 80)
    assert footprint_box(make_footprint(224, crop_pct=0.875), 100, 60) == (23.75, 3.75, 76.25, 56.25)
    with pytest.raises(UserError, match="crop_pct must be in"):
        make_footprint(224, crop_pct=1.2)


def test_chunks_follow_tar_shard_boundaries(tmp_path):
    assert chunk_rows([6, 6, 6, 2]) == 6 and chunk_rows([6, 6, 6, 8]) == 6 and chunk_rows([5]) == 5
    assert chunk_rows([4, 6, 8, 3]) == 2  # uneven shards: the gcd, so each chunk still lies in one tar shard
    counts = [4, 6, 8, 3]
    split = {"shards": [{"file": f"train-{i:06d}.tar", "count": c, "sha256": f"{i:064x}"} for i, c in enumerate(counts)],
             "count": sum(counts), "digest": "sha256:x", "content_digest": "sha256:y"}
    manifest = Manifest(tmp_path, [str(i) for i in range(10)], False, {"train": split})
    attrs = store_attrs(num_classes=10, k=K, grid=GRID, footprint=make_footprint(64), labeler={},
                        dataset=dataset_attrs(manifest, "train"), producer={})
    group = create_store(tmp_path / "uneven.zarr", attrs)
    assert group["scores"].chunks == (2, K, *GRID) and group["keys"].chunks == (2,)
    assert group["done"].shape == group["shard_sha256"].shape == group["dump_id"].shape == (4,)
    assert group["done"].chunks == group["shard_sha256"].chunks == group["dump_id"].chunks == (1,)
    store = LabelStore(tmp_path / "uneven.zarr")
    assert [store.shard_rows(i) for i in range(4)] == [(0, 4), (4, 10), (10, 18), (18, 21)]
    assert np.isnan(store.read_rows(0, 21)[0]).all() and (store.read_rows(0, 21)[1] == -1).all()
    assert not store.attrs["complete"]


class ShardRows(Dataset):
    """What a DataLoader worker of the student data path does: read one tar shard's rows."""

    def __init__(self, store: LabelStore):
        self.store = store

    def __len__(self) -> int:
        return len(self.store.attrs["dataset"]["shards"])

    def __getitem__(self, position: int):
        scores, classes = self.store.read_rows(*self.store.shard_rows(position))
        return torch.from_numpy(scores.astype(np.float32)).sum(), torch.from_numpy(classes.astype(np.int64)).sum()


def test_read_side_is_lazy_picklable_and_works_in_workers(store):
    assert store.shard_rows("train-000001.tar") == (6, 12) and store.shard_rows(3) == (18, 20)
    scores, classes = store.read_rows(6, 12)
    assert scores.shape == (6, K, *GRID) and scores.dtype == np.float16 and classes.dtype == np.int16
    copy = pickle.loads(pickle.dumps(store))  # after the group was opened: pickles as its path only
    assert "group" not in copy.__dict__
    np.testing.assert_array_equal(copy.read_rows(6, 12)[1], classes)
    sums = list(DataLoader(ShardRows(pickle.loads(pickle.dumps(store))), batch_size=None, num_workers=2))
    for position, (score_sum, class_sum) in enumerate(sums):
        s, c = store.read_rows(*store.shard_rows(position))
        assert score_sum.item() == pytest.approx(s.astype(np.float32).sum(), rel=1e-6)
        assert class_sum.item() == c.astype(np.int64).sum()
    with pytest.raises(UserError, match="no tar shard 'train-000009.tar'"):
        store.shard_rows("train-000009.tar")


def test_check_matches_refuses_stores_that_do_not_fit(store, demo_shards, tmp_path):
    manifest = load_manifest(demo_shards)
    check_matches(store, manifest, "train")
    with pytest.raises(UserError, match=r"labels split 'train', not 'val'"):
        check_matches(store, manifest, "val")
    with pytest.raises(UserError, match=r"the store has 10 classes, the shards 11"):
        check_matches(store, dataclasses.replace(manifest, classes=manifest.classes + ["extra"]), "train")
    build_demo(tmp_path / "smaller", train=14, val=2, per_shard=6)
    with pytest.raises(UserError, match=r"made from other shards .*20 keys stored, 14 in the shards, 0 missing "
                                        r"e\.g\. \[\], 6 extra e\.g\. \[.+, \.\.\.\]"):
        check_matches(store, load_manifest(tmp_path / "smaller"), "train")
    zarr.open_group(store.path, mode="r+")["done"][1] = 0
    with pytest.raises(UserError, match=r"incomplete label store \(3 of 4 shards done\); run the same dump"):
        check_matches(LabelStore(store.path), manifest, "train")


def test_check_matches_reads_the_keys_array_itself(store, demo_shards):
    """Attributes equal, but two rows' keys swapped: the rows would be joined to other images; one line."""
    manifest = load_manifest(demo_shards)
    keys = zarr.open_group(store.path, mode="r+")["keys"]
    first, second = str(keys[7]), str(keys[8])
    keys[7:9] = np.array([second, first])
    with pytest.raises(UserError) as refused:
        check_matches(LabelStore(store.path), manifest, "train")
    assert str(refused.value) == (
        f"{store.path} vs {demo_shards}/manifest.json: the store's keys array does not list the shards' keys, though "
        f"its attributes do (2 row(s) differ, first row 7: {second!r} stored, {first!r} in the shards); its rows "
        "would label other images: re-run the dump on these shards")
    keys[7:9] = np.array([first, second])
    check_matches(LabelStore(store.path), manifest, "train")


def test_a_store_finds_its_shards_wherever_it_lives(store, demo_shards, tmp_path, capsys):
    """--shards, else a <dataset>/labels/ placement, else the dataset folder the store records; else one line."""
    assert store.attrs["dataset"]["root"] == str(demo_shards.resolve())
    assert store_shards(store) == demo_shards.resolve()  # the store lives outside any dataset: its record
    failures, summary = verify_store(store.path)
    assert failures == [] and summary.startswith("ok: 20 rows")
    show(store.path, split_keys(demo_shards, "train")[0], tmp_path / "sample.png")
    assert (tmp_path / "sample.png").stat().st_size > 0
    other = tmp_path / "other"  # placed under another dataset's labels/: that dataset, whose digest then differs
    build_demo(other, train=14, val=2, per_shard=6)
    (other / "labels").mkdir()
    shutil.copytree(store.path, other / "labels" / "copy.zarr")
    assert store_shards(open_store(other / "labels" / "copy.zarr")) == other
    moved = tmp_path / "moved.zarr"  # its dataset moved away, and no labels/ folder to fall back on
    shutil.copytree(store.path, moved)
    group = zarr.open_group(moved, mode="r+")
    group.attrs["dataset"] = {**group.attrs["dataset"], "root": str(tmp_path / "gone")}
    with pytest.raises(UserError, match=rf"moved.zarr: no manifest.json in {tmp_path / 'gone'} \(the dataset it "
                                        r"records\); pass --shards DIR$"):
        store_shards(open_store(moved))
    assert store_shards(open_store(moved), demo_shards) == demo_shards
    verify_main([str(moved), "--shards", str(demo_shards)])  # the recorded folder is not part of the check
    assert capsys.readouterr().out.startswith("ok: 20 rows")


def test_open_store_and_identity_messages(tmp_path, store):
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="no label store here"):
        open_store(tmp_path / "plain")
    wanted = {**store.attrs, "k": 5, "labeler": {"model": "other"}, "complete": True}
    assert identity_differences(store.attrs, wanted) == ["k: store has 3, now 5",
                                                         "labeler.model: store has 'test', now 'other'"]


def test_second_writer_is_refused_and_the_lock_is_released(tmp_path):
    path = tmp_path / "labels.zarr"
    with store_lock(path):
        assert path.with_name("labels.zarr.lock").read_text().startswith("pid ")
        with pytest.raises(UserError, match=r"another dump is writing this store \(pid \d+ on .* since "):
            with store_lock(path):
                pass
    assert not path.with_name("labels.zarr.lock").exists()
    with store_lock(path):
        pass
