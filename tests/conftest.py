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
