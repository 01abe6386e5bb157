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


def stored_map(key: str, rng, num_classes: int = 10):
    """LV-ViT's [2, k=3, 8, 8] float16 file: the image's class on top (noisy logits), then two other classes."""
    import numpy as np

    cls = int(key.split("/")[0])
    scores = np.sort(rng.normal(size=(3, 8, 8)), axis=0)[::-1] + np.array([2.0, 0.0, 0.0])[:, None, None]
    classes = np.stack([np.full((8, 8), (cls + i) % num_classes) for i in range(3)])
    return np.stack([scores, classes]).astype(np.float16)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """(shard folder, store): demo shards (train: 2 shards of 8, val: 8) and a store of 8x8 maps for 64 px inputs
    (K=10), imported from LV-ViT .pt files."""
    import numpy as np
    import torch

    from dump.lvvit import import_lvvit
    from shards.demo import build_demo
    from shards.reader import split_keys

    root = tmp_path_factory.mktemp("data") / "demo"
    build_demo(root, train=16, val=8, per_shard=8)
    files = tmp_path_factory.mktemp("lvvit")
    rng = np.random.default_rng(0)
    for key in split_keys(root, "train"):
        (files / key).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(stored_map(key, rng)), files / f"{key}.pt")
    store = root / "labels" / "maps.zarr"
    import_lvvit(files, store, root, input_size=64)
    return root, store
