"""Fixtures shared by the test files."""

import logging

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray (2 CPUs, no dashboard) for the whole session: starting Ray costs seconds, so tests share it."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield context
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """A tiny demo shard set: train 20 images in shards of 6, 6, 6, 2 (a short last shard), val 4."""
    from shards.demo import build_demo

    root = tmp_path_factory.mktemp("data") / "demo"
    build_demo(root, train=20, val=4, per_shard=6)
    return root


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (the machine's cores are shared), restored after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def lvvit_store():
    """make(root, maps, input_size) -> a label store for the train split of the shards at root, imported from LV-ViT
    files; maps(row, key) gives each file's [2, k, H, W] array."""
    import torch

    from dump.lvvit import import_lvvit
    from shards.reader import split_keys

    def make(root, maps, input_size):
        files = root.parent / f"{root.name}-lvvit"
        for row, key in enumerate(split_keys(root, "train")):
            (files / key).parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.from_numpy(maps(row, key).astype("float16")), files / f"{key}.pt")
        store = root / "labels" / "maps.zarr"
        import_lvvit(files, store, root, input_size=input_size)
        return store

    return make


def stored_map(key: str, rng, num_classes: int = 10):
    """LV-ViT's [2, k=3, 8, 8] float16 file: the image's class on top (noisy logits), then two other classes."""
    import numpy as np

    cls = int(key.split("/")[0])
    scores = np.sort(rng.normal(size=(3, 8, 8)), axis=0)[::-1] + np.array([2.0, 0.0, 0.0])[:, None, None]
    classes = np.stack([np.full((8, 8), (cls + i) % num_classes) for i in range(3)])
    return np.stack([scores, classes]).astype(np.float16)


def demo_with_store(tmp_path_factory, lvvit_store, per_shard: int):
    """(shard folder, store): demo shards (train: 16 in shards of per_shard, val: 8) and a store of 8x8 maps for
    64 px inputs (K=10), imported from LV-ViT .pt files."""
    import numpy as np

    from shards.demo import build_demo

    root = tmp_path_factory.mktemp("data") / "demo"
    build_demo(root, train=16, val=8, per_shard=per_shard)
    rng = np.random.default_rng(0)
    return root, lvvit_store(root, lambda row, key: stored_map(key, rng), 64)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, lvvit_store):
    """demo_with_store's data, train in 2 shards of 8."""
    return demo_with_store(tmp_path_factory, lvvit_store, 8)


@pytest.fixture(scope="session")
def one_shard_dataset(tmp_path_factory, lvvit_store):
    """demo_with_store's data, train in one shard of 16."""
    return demo_with_store(tmp_path_factory, lvvit_store, 16)


@pytest.fixture(scope="session")
def make_store():
    """make(path, manifest, scores, classes, keys, valid=None, split="train", num_classes=None): a complete
    store of these maps ([N, k, H, W], all of `split`; footprint 64 px), written tar shard by tar shard as a
    dump does (dump.store.write.write_shard)."""
    import numpy as np

    from dump.store.schema import create_store, dataset_attrs, make_footprint, shard_range, store_attrs
    from dump.store.write import mark_complete, write_shard

    def make(path, manifest, scores, classes, keys, valid=None, split="train", num_classes=None):
        group = create_store(path, store_attrs(
            num_classes=num_classes or manifest.num_classes, k=scores.shape[1], grid=scores.shape[2:],
            footprint=make_footprint(64), labeler={"model": "test"}, dataset=dataset_attrs(manifest, split),
            producer={"tool": "test"}))
        valid = np.ones(len(keys), np.uint8) if valid is None else valid
        for position, sha256 in enumerate(manifest.shard_digests(split)):
            rows = slice(*shard_range(group.attrs["dataset"]["shards"], position))
            write_shard(group, position, scores=scores[rows], classes=classes[rows], valid=valid[rows],
                        keys=list(keys[rows]), sha256=sha256)
        mark_complete(group)

    return make
