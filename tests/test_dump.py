"""The label dump end to end: real local Ray (Ray Data), real tar shards, real Zarr on disk, real kill -9; and Ray as
users type it: a `ray start --head` cluster (joined without --address, and through `ray job submit` with token
authentication) and two real Ray nodes of a ray.cluster_utils.Cluster.

Every cluster started here is the test's own: loopback only, free ports, its own temp dir (RAY_TMPDIR), so that
nobody else's `ray.init()` on this machine finds it; `ray start --block` is stopped by its pid and takes its
processes with it.
"""

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr

from common.errors import UserError
from core.checkpoint import save_checkpoint
from core.imaging.boxes import fill_colour, shifted
from core.imaging.device import normalise
from core.imaging.pil import labeler_input
from dump.batch_labeler import BatchLabeler
from dump.dump_labels import dump
from dump.dump_labels import main as dump_main
from dump.job import DumpJob
from dump.ray_engine import run_ray
from dump.store.checks import check_matches
from dump.store.reader import open_store
from dump.store.schema import footprint_box, make_footprint
from dump.verify import main as verify_main
from dump.verify import verify_store
from dump.writer import ShardWriter
from labeler.load import load_labeler
from shards.manifest import load_manifest
from shards.reader import read_shard, split_keys

ROOT = Path(__file__).resolve().parents[1]
BATCH, TOPK = 4, 5  # shards of 6 images: batches of 4 + 2 (each cut from one shard), so partial batches are covered
SHIFT = 3.5  # fan_demo_tiny_p8's stride-2 conv stem centres token c at 8c + 0.5 px: the view moves by 4 - 0.5
ARRAYS = ("scores", "classes", "keys", "valid", "shard_sha256", "done")  # all but dump_id: each dump has its own


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
    summary = dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH)
    assert (summary["device"], summary["precision"], summary["decode"]) == ("cpu", "fp32", "cpu")
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


def wait_for(condition, timeout: float = 600.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def done_count(store: Path) -> int:
    """Shards whose done flag is written (one chunk file each), read from the file system without Zarr."""
    return len(os.listdir(store / "done" / "c")) if (store / "done" / "c").is_dir() else 0


def assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert {**ga.attrs, "dump_id": None} == {**gb.attrs, "dump_id": None}
    assert (ga["dump_id"][:] == ga.attrs["dump_id"]).all() and (gb["dump_id"][:] == gb.attrs["dump_id"]).all()
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
                boxes = [shifted(footprint_box(store.footprint, *s["image"].size), SHIFT, 64) for s in samples[b:b + BATCH]]
                pixels = np.stack([labeler_input(s["image"], box, 64, "bicubic", fill_colour(config["mean"]))
                                   for s, box in zip(samples[b:b + BATCH], boxes)])
                x = normalise(torch.from_numpy(pixels).permute(0, 3, 1, 2), config["mean"], config["std"])
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
    assert attrs["footprint"] == make_footprint(64, 1.0, "bicubic", shift=SHIFT)
    assert attrs["producer"] == {"tool": "dump.dump_labels", "batch_size": BATCH, "device": "cpu", "precision": "fp32",
                                 "decode": "cpu", "threads_per_actor": 1}
    assert store.group["scores"].chunks == (6, TOPK, 8, 8) and store.group["classes"].dtype == np.int16
    assert sorted(os.listdir(reference / "scores" / "c")) == ["0", "1", "2", "3"]  # one chunk per tar shard
    check_matches(store, manifest, "train")
    failures, summary = verify_store(reference)  # shards found as the store's <dataset>/labels/.. parent
    assert failures == [] and summary.startswith("ok: 20 rows")


def test_the_engine_without_ray_writes_the_same_bits(reference, demo_shards, checkpoint, tmp_path):
    out = tmp_path / "local.zarr"
    summary = dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH, engine="local", workers=2)
    assert summary["dumped_shards"] == 4 and summary["labelled_on"] == ["local"]
    assert_same_store(out, reference)


@pytest.mark.parametrize("setting, value", [("decode", "device"), ("precision", "bf16")])
def test_device_decode_and_half_precision_label_alike_and_are_never_mixed(reference, demo_shards, checkpoint,
                                                                           tmp_path, setting, value):
    """torchvision decode + matrix resampling (the GPU path, here on CPU tensors) and bf16 autocast give the
    fp32 PIL labels up to rounding; the store records the setting and refuses to resume with another."""
    out = tmp_path / f"{value}.zarr"
    summary = dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH, engine="local", workers=0,
                   **{setting: value})
    assert summary[setting] == value and open_store(out).attrs["producer"][setting] == value
    store, ref = open_store(out), open_store(reference)
    (scores, classes), (ref_scores, ref_classes) = store.read_rows(0, 20), ref.read_rows(0, 20)
    assert (classes[:, 0] == ref_classes[:, 0]).mean() > 0.97  # top-1 per token
    tolerance = 0.05 if setting == "decode" else 0.15  # one uint8 level of input / bf16's 8-bit mantissa
    assert np.abs(scores.astype(np.float32) - ref_scores.astype(np.float32)).max() < tolerance * np.abs(ref_scores).max()
    with pytest.raises(UserError, match=rf"producer\.{setting}: store has '{value}', now '[a-z0-9]+'.*--overwrite"):
        dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH, engine="local")


def test_input_size_off_the_labeler_stride_is_refused(demo_shards, checkpoint, tmp_path, capsys):
    out = tmp_path / "s70.zarr"
    with pytest.raises(UserError, match=r"--input-size 70 is not a multiple of labeler fan_demo_tiny_p8's stride 8; "
                                        r"use e\.g\. 64 or 72"):
        dump(demo_shards, checkpoint, out, topk=TOPK, input_size=70, engine="local")
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        dump_main(dump_argv(demo_shards, checkpoint, out, "--input-size", "4"))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "stride 8" in err and "\n" not in err
    summary = dump(demo_shards, checkpoint, tmp_path / "s72.zarr", topk=TOPK, input_size=72, engine="local", workers=0)
    assert summary["grid"] == (9, 9)


def labeler_processes(cluster) -> list[int]:
    """Pids of Ray Data's labeler actor processes of this test's cluster, never of another Ray on the machine:
    Ray sets their process title to the actor's class, and they are children of the cluster's raylet."""
    session, found = cluster.address_info["session_dir"].encode(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            found.append((int(pid), parent, Path(f"/proc/{pid}/cmdline").read_bytes()))
        except (OSError, IndexError, ValueError):
            continue
    raylets = {pid for pid, _, command in found if command.split(b"\0")[0].endswith(b"/raylet") and session in command}
    return [pid for pid, parent, command in found if parent in raylets and b"MapBatches(LabelBatches)" in command]


def test_race_worker_kill_driver_kill_then_resume_is_bitwise_equal(ray_cluster, reference, demo_shards, checkpoint,
                                                                   tmp_path):
    out = tmp_path / "killed.zarr"
    argv = dump_argv(demo_shards, checkpoint, out)
    driver = start_cli_dump(ray_cluster, argv)
    # a second dump of the same store while the first one runs is refused, naming the owner
    wait_for(lambda: out.with_name("killed.zarr.lock").exists(), what="the first dump's lock")
    with pytest.raises(UserError, match=r"another dump is writing this store \(pid \d+ on "):
        dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH)
    # kill -9 the labeler actor before any shard is done: the round ends, and a new one, with a new actor, goes on
    wait_for(lambda: labeler_processes(ray_cluster) or driver.poll() is not None, what="a labeler actor")
    victims = labeler_processes(ray_cluster)
    assert victims and done_count(out) == 0, "no labeler actor was caught before its first shard"
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
    summary = dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH)
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
    # by path, as `ray submit CLUSTER.yaml dump/dump_labels.py -- ...` runs it: the repo is made importable
    address = ray_cluster.address_info["gcs_address"]
    by_path = subprocess.run([sys.executable, str(ROOT / "dump" / "dump_labels.py"), "--address", address,
                              *dump_argv(demo_shards, checkpoint, reference)], cwd=tmp_path, capture_output=True,
                             text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=300)
    assert by_path.returncode == 0 and "already complete (20 rows); nothing to do" in by_path.stdout, by_path.stderr
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
        dump(broken, checkpoint, out, topk=TOPK, batch_size=BATCH)
    assert not open_store(out).attrs["complete"]
    summary = dump(broken, checkpoint, out, topk=TOPK, batch_size=BATCH, on_error="skip")
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
    # the device decoder finds the same sample when it decodes the batch
    with pytest.raises(UserError, match=rf"train-000001\.tar: {keys[row]}: cannot decode its image"):
        dump(broken, checkpoint, broken / "labels" / "device.zarr", topk=TOPK, batch_size=BATCH, engine="local",
             decode="device", workers=0)
    summary = dump(broken, checkpoint, broken / "labels" / "device.zarr", topk=TOPK, batch_size=BATCH,
                   engine="local", decode="device", workers=0, on_error="skip")
    assert summary["skipped"] == [{"row": row, "key": keys[row]}]


def finish_cli(driver: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = driver.communicate(timeout=timeout)
    return driver.returncode, out, err


def test_a_failed_dump_is_one_line_and_rays_report_comes_only_with_verbose(ray_cluster, demo_shards, checkpoint,
                                                                            tmp_path):
    """Before: exit 2 after three of Ray's tracebacks, and an `error:` line holding a fourth."""
    key = split_keys(demo_shards, "train")[8]
    broken = corrupt_copy(demo_shards, tmp_path / "broken", "train-000001.tar", key)
    want = f"error: {broken / 'train-000001.tar'}: {key}: cannot decode"
    code, _, err = finish_cli(start_cli_dump(ray_cluster, dump_argv(broken, checkpoint, tmp_path / "a.zarr")))
    assert code == 2 and err.count("\n") == 1 and err.startswith(want), err[-3000:]
    code, _, err = finish_cli(start_cli_dump(ray_cluster, dump_argv(broken, checkpoint, tmp_path / "b.zarr",
                                                                    "--verbose")))
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith(want), err[-3000:]
    cut = tmp_path / "cut"  # a tar cut short, as by a copy that did not finish
    shutil.copytree(demo_shards, cut, ignore=shutil.ignore_patterns("labels"))
    data = (demo_shards / "train-000002.tar").read_bytes()
    (cut / "train-000002.tar").write_bytes(data[:len(data) // 2])
    code, _, err = finish_cli(start_cli_dump(ray_cluster, dump_argv(cut, checkpoint, tmp_path / "c.zarr")))
    assert code == 2 and err.count("\n") == 1, err[-3000:]
    assert err.startswith(f"error: {cut / 'train-000002.tar'}: truncated or corrupt tar"), err


def test_a_killed_labeler_actor_is_replaced_quietly_and_the_store_is_the_same(ray_cluster, reference, demo_shards,
                                                                              checkpoint, tmp_path):
    out = tmp_path / "replaced.zarr"
    driver = start_cli_dump(ray_cluster, dump_argv(demo_shards, checkpoint, out))
    wait_for(lambda: labeler_processes(ray_cluster) or driver.poll() is not None, what="a labeler actor")
    victims = labeler_processes(ray_cluster)
    assert victims and done_count(out) == 0, "no labeler actor was caught before its first shard"
    os.kill(victims[0], signal.SIGKILL)
    code, _, err = finish_cli(driver)
    assert code == 0, err[-3000:]
    assert_same_store(out, reference)
    assert err.startswith("warning: Ray lost a worker or labeler actor (ActorDiedError") and err.count("\n") == 1, err
    assert "constructor arguments in the object store" not in err


def test_an_actor_killed_every_time_ends_the_dump_in_bounded_time_with_one_line(ray_cluster, reference, demo_shards,
                                                                                 checkpoint, tmp_path):
    """Before: Ray Data restarted the actor and retried its batch without limit. A store with one shard to do:
    the line names it."""
    out = tmp_path / "doomed.zarr"
    shutil.copytree(reference, out)
    group = zarr.open_group(out, mode="r+")
    group["done"][1], group.attrs["complete"] = 0, False
    started = time.monotonic()
    driver = start_cli_dump(ray_cluster, dump_argv(demo_shards, checkpoint, out))
    killed = set()
    while driver.poll() is None:
        for pid in set(labeler_processes(ray_cluster)) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        assert time.monotonic() - started < 300, "the dump did not end"
        time.sleep(0.005)
    code, _, err = finish_cli(driver)
    *warnings, last = err.strip().splitlines()
    assert code == 2 and len(killed) >= 3 and len(warnings) == 2, err[-3000:]
    assert all(line.startswith("warning: Ray lost a worker or labeler actor") for line in warnings)
    assert last.startswith("error: Ray lost a worker or labeler actor in each of 3 rounds (ActorDiedError: ")
    assert "; 1 shard(s) unfinished: train-000001.tar; finished shards are kept" in last
    assert zarr.open_group(out)["done"][:].tolist() == [1, 0, 1, 1]


def test_a_failed_write_stops_the_dump_at_that_shard_and_keeps_what_was_written(reference, demo_shards, checkpoint,
                                                                                tmp_path):
    """Before: the dump labelled every other shard, then died with a bare OSError. A real write failure: a file
    where the writer must create the folder of shard 1's chunk."""
    out = tmp_path / "blocked.zarr"
    shutil.copytree(reference, out)
    group = zarr.open_group(out, mode="r+")
    group["done"][1:], group.attrs["complete"] = 0, False
    shutil.rmtree(out / "scores" / "c" / "1")
    (out / "scores" / "c" / "1").write_text("in the way")
    argv = [sys.executable, "-m", "dump.dump_labels", *dump_argv(demo_shards, checkpoint, out), "--engine", "local",
            "--workers", "0"]
    run = subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr[-3000:]
    assert run.stderr.startswith(f"error: {out.resolve()}: writing shard train-000001.tar failed (NotADirectoryError: ")
    assert "run the same command again to resume" in run.stderr
    assert zarr.open_group(out)["done"][:].tolist() == [1, 0, 0, 0]  # stopped at the first failure
    (out / "scores" / "c" / "1").unlink()
    assert dump(demo_shards, checkpoint, out, topk=TOPK, batch_size=BATCH, engine="local")["dumped_shards"] == 3
    assert_same_store(out, reference)


def test_labelers_refuse_a_checkpoint_replaced_since_the_driver_read_it(ray_cluster, reference, demo_shards,
                                                                        checkpoint, tmp_path):
    """The job carries the sha256 the driver read; a last.pt renamed over meanwhile (a labeler still training)
    would mix two labelers under one recorded hash: every labeler refuses it, in the driver's one line."""
    path = tmp_path / "last.pt"
    shutil.copy(checkpoint, path)
    attrs = open_store(reference).attrs
    out = tmp_path / "store.zarr"
    shutil.copytree(reference, out)
    zarr.open_group(out, mode="r+")["done"][0] = 0
    job = DumpJob(load_manifest(demo_shards), "train", str(path), str(out), TOPK, attrs["footprint"],
                  tuple(attrs["labeler"]["mean"]), tuple(attrs["labeler"]["std"]), BATCH, 1, "raise", "cpu", "fp32",
                  "cpu", attrs["labeler"]["sha256"])
    BatchLabeler(job)  # the file the driver read
    make_checkpoint(tmp_path / "next.pt", seed=1).replace(path)
    message = rf"{path}: replaced since this job read it \(sha256 {attrs['labeler']['sha256'][:12]}\.\.\., now "
    with pytest.raises(UserError, match=message):
        BatchLabeler(job)
    with pytest.raises(UserError, match=message) as refused:  # the same from Ray Data's labeler actors
        run_ray(job, [0], ShardWriter(job), actors=1, gpus_per_actor=0.0, cpus_per_actor=1.0)
    assert "\n" not in str(refused.value)
    assert zarr.open_group(out)["done"][:].tolist() == [0, 1, 1, 1]


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """A `ray start --head` cluster with token authentication, its dashboard (the job server) on loopback."""
    tmp = Path(tempfile.mkdtemp(prefix="tlray", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PYTHONPATH=str(ROOT))
    port, dashboard = free_port(), free_port()
    ports = {"--port": port, "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port()}
    command = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(tmp / "ray"),
               "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--disable-usage-stats", *[str(a) for flag, value in ports.items() for a in (flag, value)]]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        address_file = tmp / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not address_file.exists():
            assert process.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        yield {"env": env, "dashboard": f"http://127.0.0.1:{dashboard}", "logs": tmp / "ray" / "session_latest" / "logs"}
    finally:
        process.send_signal(signal.SIGTERM)  # --block: ray start stops the processes it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_dump_joins_a_running_cluster_without_address(head, reference, demo_shards, checkpoint, tmp_path):
    """Before: `ValueError: When connecting to an existing cluster, num_cpus and num_gpus must not be provided`."""
    out = tmp_path / "joined.zarr"
    driver = subprocess.run([sys.executable, "-m", "dump.dump_labels", *dump_argv(demo_shards, checkpoint, out)],
                            cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    assert driver.stderr == ""  # not even Ray's warning that restarts may not find the actors' arguments
    assert_same_store(out, reference)
    drivers = list(head["logs"].glob("python-core-driver-*.log"))
    assert drivers, "the dump did not run as a driver of the `ray start` cluster"


def test_ray_job_submit_with_token_auth(head, reference, demo_shards, checkpoint, tmp_path):
    """What the README says to set for `ray job submit` against a token-auth cluster: RAY_AUTH_MODE=token (the
    token from ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)."""
    out = tmp_path / "job.zarr"
    submit = ["ray", "job", "submit", "--address", head["dashboard"], "--working-dir", str(ROOT), "--",
              "python", "-m", "dump.dump_labels", *dump_argv(demo_shards, checkpoint, out)]
    without_mode = {k: v for k, v in head["env"].items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run(submit, cwd=ROOT, env=without_mode, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()
    job = subprocess.run(submit, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=300)
    assert job.returncode == 0 and "succeeded" in job.stdout.lower(), (job.stdout + job.stderr)[-3000:]
    assert_same_store(out, reference)


MULTI_NODE = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from dump.dump_labels import dump
from pathlib import Path

shards, checkpoint, out = map(Path, sys.argv[1:4])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
try:
    ray.init(address=cluster.address)
    summary = dump(shards, checkpoint, out, topk=int(sys.argv[4]), batch_size=int(sys.argv[5]))
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    print(json.dumps({"nodes": nodes, "decoded_on": summary["decoded_on"], "labelled_on": summary["labelled_on"]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_nodes_share_the_dump(reference, demo_shards, checkpoint, tmp_path):
    """Two real Ray nodes (ray.cluster_utils.Cluster) of one CPU each: the labeler actor holds one node's CPU, so
    Ray Data must run the decode tasks on the other; the store is the same, bit for bit."""
    out = tmp_path / "two-nodes.zarr"
    tmp = tempfile.mkdtemp(prefix="tlray", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT))
    try:
        run = subprocess.run([sys.executable, "-c", MULTI_NODE, str(demo_shards), str(checkpoint), str(out),
                              str(TOPK), str(BATCH)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report["nodes"]) == 2
    assert len(report["labelled_on"]) == 1 and set(report["decoded_on"]) | set(report["labelled_on"]) == set(
        report["nodes"]), report
    assert_same_store(out, reference)
