"""The Ray label dump end to end: real local Ray, real tar shards, real Zarr on disk, real kill -9."""

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from PIL import Image

from core.checkpoint import save_checkpoint
from dump.dump_labels import dump, labeler_input
from dump.dump_labels import main as dump_main
from dump.store import check_matches, make_footprint, open_store
from dump.verify import main as verify_main
from dump.verify import verify_store
from labeler.load import load_labeler
from shards.errors import UserError
from shards.manifest import load_manifest
from shards.reader import read_shard, split_keys

ROOT = Path(__file__).resolve().parents[1]
BATCH, TOPK = 4, 5  # shards of 6 images: batches of 4 + 2, so partial batches are covered
ARRAYS = ("scores", "classes", "keys", "valid", "done")


def make_checkpoint(path: Path, seed: int) -> Path:
    import labeler  # noqa: F401  (registers the demo FAN)

    torch.manual_seed(seed)
    model = timm.create_model("fan_demo_tiny_p8", num_classes=10)
    save_checkpoint(path, model_name="fan_demo_tiny_p8", num_classes=10, img_size=64, model=model, ema=model,
                    train_state={"epoch": 1})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", seed=0)


@pytest.fixture(scope="module")
def reference(ray_cluster, demo_shards, checkpoint):
    """An uninterrupted dump: the store every other dump must reproduce bit for bit."""
    out = demo_shards / "labels" / "reference.zarr"
    dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH, actors=2)
    return out


def dump_argv(shards: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", str(shards), "--checkpoint", str(checkpoint), "--out", str(out), "--topk", str(TOPK),
            "--batch-size", str(BATCH), *extra]


def start_cli_dump(ray_cluster, argv: list[str]) -> subprocess.Popen:
    """`python -m dump.dump_labels ...` as its own driver process on the shared cluster (like `ray job submit`)."""
    address = ray_cluster.address_info["gcs_address"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "dump.dump_labels", *argv, "--address", address], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 180.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def done_count(store: Path) -> int:
    """Shards whose done flag is written (one chunk file each), read from the file system without Zarr."""
    return len(os.listdir(store / "done" / "c")) if (store / "done" / "c").is_dir() else 0


def assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert dict(ga.attrs) == dict(gb.attrs)
    for name in ARRAYS:
        x, y = ga[name][:], gb[name][:]
        if x.dtype == np.float16:
            x, y = x.view(np.uint16), y.view(np.uint16)  # bitwise, NaN included
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_dump_equals_the_labeler_run_directly(reference, demo_shards, checkpoint):
    store = open_store(reference)
    manifest = load_manifest(demo_shards)
    model, meta = load_labeler(checkpoint)
    config = timm.data.resolve_model_data_config(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the dump's actors run one thread each
    try:
        for name, count in manifest.shards("train"):
            start, stop = store.shard_rows(name)
            scores, classes = store.read_rows(start, stop)
            samples = list(read_shard(demo_shards, "train", name))
            assert [s["index"] for s in samples] == list(range(start, stop)) and stop - start == count
            for b in range(0, count, BATCH):
                x = torch.stack([labeler_input(s["image"], store.footprint, config["mean"], config["std"])
                                 for s in samples[b:b + BATCH]])
                with torch.inference_mode():
                    _, tokens, (h, w) = model.forward_dense(x)
                values, ids = tokens.topk(TOPK, dim=-1)
                want_scores = values.half().numpy().reshape(len(x), h, w, TOPK).transpose(0, 3, 1, 2)
                want_classes = ids.numpy().reshape(len(x), h, w, TOPK).transpose(0, 3, 1, 2)
                np.testing.assert_array_equal(scores[b:b + BATCH].view(np.uint16), want_scores.view(np.uint16))
                np.testing.assert_array_equal(classes[b:b + BATCH], want_classes)
    finally:
        torch.set_num_threads(threads)
    attrs = store.attrs
    assert store.keys.tolist() == split_keys(demo_shards, "train")
    assert store.valid().all() and store.done().all() and attrs["complete"] and attrs["skipped"] == []
    assert (attrs["k"], attrs["grid"], attrs["num_classes"], attrs["value"]) == (TOPK, [8, 8], 10, "logits")
    assert attrs["labeler"]["sha256"] == meta["sha256"] and attrs["dataset"]["digest"] == manifest.digest("train")
    assert attrs["footprint"] == make_footprint(64, 1.0, "bicubic")
    assert store.group["scores"].chunks == (6, TOPK, 8, 8) and store.group["classes"].dtype == np.int16
    assert sorted(os.listdir(reference / "scores" / "c")) == ["0", "1", "2", "3"]  # one chunk per tar shard
    check_matches(store, manifest, "train")
    failures, summary = verify_store(reference)  # shards found as the store's <dataset>/labels/.. parent
    assert failures == [] and summary.startswith("ok: 20 rows")


def test_preprocessing_is_exactly_the_footprint_box():
    pixels = np.random.default_rng(0).integers(0, 256, size=(60, 100, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for crop_pct, box in ((1.0, (20, 0, 80, 60)), (0.5, (35, 15, 65, 45))):
        x = labeler_input(image, make_footprint(32, crop_pct), mean=(0, 0, 0), std=(1, 1, 1))
        want = np.asarray(image.crop(box).resize((32, 32), Image.BICUBIC), np.float32) / 255
        got = x.permute(1, 2, 0).numpy()
        # away from the border the filter sees only pixels inside the box: equal to cropping first, exactly
        # (at the border the dump's resample also weighs the pixels just outside the box, as it should)
        np.testing.assert_array_equal(got[3:-3, 3:-3], want[3:-3, 3:-3])


def labeler_processes() -> list[int]:
    """Pids of Ray actor processes running a ShardLabeler task (Ray sets their process title)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"ShardLabeler.label_shard" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_race_worker_kill_driver_kill_then_resume_is_bitwise_equal(ray_cluster, reference, demo_shards, checkpoint,
                                                                   tmp_path):
    out = tmp_path / "killed.zarr"
    argv = dump_argv(demo_shards, checkpoint, out, "--actors", "1", "--shards-in-flight", "1")
    driver = start_cli_dump(ray_cluster, argv)
    # a second dump of the same store while the first one runs is refused, naming the owner
    wait_for(lambda: out.with_name("killed.zarr.lock").exists(), what="the first dump's lock")
    with pytest.raises(UserError, match=r"another dump is writing this store \(pid \d+ on "):
        dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH)
    # kill -9 the labelling worker mid-shard: Ray restarts the actor and retries the shard
    wait_for(lambda: labeler_processes() or driver.poll() is not None, what="a labelling actor")
    victims = labeler_processes()
    assert victims and done_count(out) == 0, "no worker was caught labelling its first shard"
    os.kill(victims[0], signal.SIGKILL)
    # kill -9 the driver once the retried work has finished a shard but not all of them
    wait_for(lambda: done_count(out) >= 1 or driver.poll() is not None, what="the first finished shard")
    assert driver.poll() is None, driver.communicate()[1][-2000:]
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done = done_count(out)
    assert 1 <= done < 4, f"kill landed after {done} of 4 shards; the test needs a partial dump"
    with pytest.raises(UserError, match=rf"incomplete label store \({done} of 4 shards done\)"):
        check_matches(open_store(out), load_manifest(demo_shards), "train")
    failures, _ = verify_store(out, demo_shards)
    assert any("incomplete" in f for f in failures)
    summary = dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH, actors=1)
    assert summary["dumped_shards"] == 4 - done
    assert not out.with_name("killed.zarr.lock").exists()
    assert_same_store(out, reference)


def test_other_settings_are_refused_without_overwrite(ray_cluster, reference, demo_shards, checkpoint, tmp_path,
                                                      capsys):
    with pytest.raises(UserError, match=r"k: store has 5, now 3.*pass --overwrite"):
        dump(demo_shards, checkpoint, reference, topk=3, batch_size=BATCH)
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(UserError, match=r"labeler\.sha256: store has '[0-9a-f]{64}', now '[0-9a-f]{64}'"):
        dump(demo_shards, other, reference, topk=TOPK, batch_size=BATCH)
    with pytest.raises(UserError, match=r"producer\.batch_size: store has 4, now 8"):
        dump(demo_shards, checkpoint, reference, topk=TOPK, batch_size=8)
    assert open_store(reference).attrs["complete"]
    with pytest.raises(SystemExit) as exit_info:
        dump_main(dump_argv(demo_shards, tmp_path / "missing.pt", tmp_path / "x.zarr"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.pt: checkpoint not found" in err and "\n" not in err


def corrupt_copy(shards: Path, dest: Path, shard: str, key: str) -> Path:
    """A copy of the shard set whose `key` in `shard` has garbage instead of JPEG bytes (same keys, same counts)."""
    shutil.copytree(shards, dest, ignore=shutil.ignore_patterns("labels"))
    with tarfile.open(shards / shard) as src, tarfile.open(dest / shard, "w") as out:
        for member in src:
            data = src.extractfile(member).read()
            if member.name == f"{key}.jpg":
                data = b"this is not a jpeg"
                member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    return dest


def test_corrupt_image_raises_or_is_recorded(ray_cluster, reference, demo_shards, checkpoint, tmp_path):
    keys = split_keys(demo_shards, "train")
    row = 8  # in the second shard, train-000001.tar
    broken = corrupt_copy(demo_shards, tmp_path / "broken", "train-000001.tar", keys[row])
    out = broken / "labels" / "skip.zarr"
    with pytest.raises(UserError, match=rf"train-000001\.tar: {keys[row]}: cannot decode"):
        dump(broken, checkpoint, out, topk=TOPK, batch_size=BATCH, actors=1)
    assert not open_store(out).attrs["complete"]
    summary = dump(broken, checkpoint, out, topk=TOPK, batch_size=BATCH, actors=1, on_error="skip")
    assert summary["skipped"] == [{"row": row, "key": keys[row]}]
    store, ref = open_store(out), open_store(reference)
    assert store.attrs["skipped"] == [{"row": row, "key": keys[row]}] and store.attrs["complete"]
    assert store.valid().tolist() == [int(r != row) for r in range(20)] and store.keys[row] == keys[row]
    scores, classes = store.read_rows(row, row + 1)
    assert np.isnan(scores).all() and (classes == -1).all()
    for other in (0, 2, 3):  # shards without the corrupt sample are unchanged, bit for bit
        start, stop = ref.shard_rows(other)
        np.testing.assert_array_equal(store.read_rows(start, stop)[0].view(np.uint16),
                                      ref.read_rows(start, stop)[0].view(np.uint16))
    failures, summary = verify_store(out)
    assert failures == [] and "1 skipped row(s)" in summary


def plant(group: zarr.Group, path: Path, fault: str) -> None:
    """Damage a copy of a good store in one specific way."""
    if fault == "wrong key order":
        group["keys"][0:2] = group["keys"][0:2][::-1]
    elif fault == "missing rows":
        (path / "scores" / "c" / "1" / "0" / "0" / "0").unlink()
    elif fault == "nan":
        group["scores"][3, 2, 4, 5] = np.nan
    elif fault == "score order":
        scores = group["scores"][5]
        scores[[0, 1], 1, 1] = scores[[1, 0], 1, 1]
        group["scores"][5] = scores
    elif fault == "class out of range":
        group["classes"][7, 0, 0, 0] = 10
    elif fault == "manifest digest":
        group.attrs["dataset"] = {**group.attrs["dataset"], "digest": "sha256:" + "0" * 64}
    elif fault == "incomplete":
        group["done"][2] = 0


@pytest.mark.parametrize("fault, message", [
    ("wrong key order", "2 row(s) hold the wrong key, first row 0"),
    ("missing rows", "6 row(s) with non-finite scores, first row 6"),
    ("nan", "1 row(s) with non-finite scores, first row 3"),
    ("score order", "1 row(s) with scores not descending along k, first row 5"),
    ("class out of range", "1 row(s) with class ids outside [0, 10), first row 7"),
    ("manifest digest", "dataset.digest is 'sha256:000"),
    ("incomplete", "incomplete (3 of 4 shards done"),
])
def test_verify_catches_planted_faults(reference, demo_shards, tmp_path, capsys, fault, message):
    path = tmp_path / "damaged.zarr"
    shutil.copytree(reference, path)
    plant(zarr.open_group(path, mode="r+"), path, fault)
    failures, _ = verify_store(path, demo_shards)
    assert any(message in f for f in failures), failures
    with pytest.raises(SystemExit) as exit_info:
        verify_main([str(path), "--shards", str(demo_shards)])
    assert exit_info.value.code == 1 and message in capsys.readouterr().err
