"""A store fits only the images it was made from, is refused when rows went missing or it was replaced while read,
is written durably, and `--overwrite` replaces only our own outputs: the attacks, run for real (real tar shards,
Zarr on disk, subprocess CLIs, strace of the real system calls)."""

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from torch.utils.data import DataLoader

from common.errors import UserError, one_line
from common.files import MARKER
from dump.dump_labels import dump
from dump.lvvit import export_lvvit, import_lvvit
from dump.quality import store_quality
from dump.show import show
from dump.store.checks import check_matches
from dump.store.reader import open_store
from dump.verify import verify_store
from shards.build import Sample, prepare_out, write_dataset
from shards.demo import CLASSES, build_demo, demo_samples
from shards.manifest import content_digest, keys_digest, load_manifest, write_manifest
from shards.reader import split_keys
from train.augment import LabelAwareTransform
from train.data import StudentData

ROOT = Path(__file__).resolve().parents[1]
TRAIN, VAL, PER_SHARD = 16, 4, 8  # two train shards of 8


def label_files(root: Path, dest: Path) -> Path:
    """LV-ViT files [2, k=2, 8, 8] for every train key of `root`: top-1 the image's class."""
    for key in split_keys(root, "train"):
        cls = int(key.split("/")[0])
        scores = np.stack([np.full((8, 8), 2.0), np.zeros((8, 8))])
        classes = np.stack([np.full((8, 8), cls), np.full((8, 8), (cls + 1) % 10)])
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(np.stack([scores, classes]).astype(np.float16)), dest / f"{key}.pt")
    return dest


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, Path, Path]:
    """(shard folder, its LV-ViT files, a store imported from them at <dataset>/labels/maps.zarr)."""
    root = tmp_path / "demo"
    build_demo(root, train=TRAIN, val=VAL, per_shard=PER_SHARD)
    files = label_files(root, tmp_path / "files")
    store = root / "labels" / "maps.zarr"
    import_lvvit(files, store, root, input_size=64)
    return root, files, store


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def assert_one_line(run: subprocess.CompletedProcess, needle: str) -> None:
    err = run.stderr.strip()
    assert run.returncode == 2 and needle in err and "\n" not in err and "Traceback" not in err, run.stderr


def plain() -> LabelAwareTransform:
    return LabelAwareTransform(64, auto_augment=None, color_jitter=None, re_prob=0.0)


def rebuild_with_other_images(root: Path) -> None:
    """Rebuild the demo dataset in place (labels/ kept, as a rebuild does) with a different seed's images under
    the same keys, classes and shard layout."""
    prepare_out(root, overwrite=True)
    splits = {}
    for split, count in (("train", TRAIN), ("val", VAL)):
        pairs = zip(demo_samples(split, count, 64, 0), demo_samples(split, count, 64, 1))
        splits[split] = ((Sample(a.key, a.image_ext, b.image, a.cls, b.mask) for a, b in pairs), count)
    write_dataset(root, CLASSES, splits, per_shard=PER_SHARD, hflip=False)


def test_other_images_under_the_same_keys_are_refused_by_every_reader(dataset, tmp_path):
    root, _, store = dataset
    keys, digest = split_keys(root, "train"), load_manifest(root).digest("train")
    StudentData(root, store, plain())  # fits before the rebuild
    rebuild_with_other_images(root)
    assert split_keys(root, "train") == keys and load_manifest(root).digest("train") == digest  # names unchanged
    assert store.is_dir()
    differs = "tar shard train-000000.tar is not the one labelled"
    failures, _ = verify_store(store)
    assert len(failures) == 1 and differs in failures[0], failures
    for read in (lambda: StudentData(root, store, plain()), lambda: export_lvvit(store, tmp_path / "out"),
                 lambda: store_quality(store), lambda: show(store, keys[0], tmp_path / "x.png")):
        with pytest.raises(UserError, match=differs):
            read()
    assert_one_line(cli("dump.lvvit", "export", store, tmp_path / "out"), differs)
    assert not (tmp_path / "out").exists()


def test_a_version_1_store_is_refused_in_one_line(dataset):
    root, _, store = dataset
    group = zarr.open_group(store, mode="r+")
    group.attrs["version"] = 1
    assert_one_line(cli("dump.verify", store), "a version 1 tokenlabel-labels store")
    with pytest.raises(UserError, match=r"re-dump it \(dump.dump_labels --overwrite\) or re-import it"):
        StudentData(root, store, plain())


def test_chunk_files_missing_now_are_refused_and_all_fill_chunks_are_written(dataset, tmp_path, make_store):
    root, _, store = dataset
    (store / "scores" / "c" / "1" / "0" / "0" / "0").unlink()  # shard 1's maps: Zarr would read NaN, as skipped
    lost = r"tar shard train-000001.tar is done but 1 of its chunk files are missing \(e.g. scores/c/1/0/0/0\)"
    with pytest.raises(UserError, match=lost):
        check_matches(open_store(store), load_manifest(root), "train")
    assert any(re.search(lost, f) for f in verify_store(store)[0])
    with pytest.raises(UserError, match=lost):
        StudentData(root, store, plain())
    # a shard whose every sample was skipped holds fill values only (NaN, -1, valid 0): its chunks exist all the same
    manifest = load_manifest(root)
    skipped = tmp_path / "skipped.zarr"
    n = manifest.count("train")
    valid = np.repeat([1, 0], PER_SHARD).astype(np.uint8)
    scores = np.where(valid[:, None, None, None], 1.0, np.nan) * np.ones((n, 1, 2, 2))
    classes = np.where(valid[:, None, None, None], 0, -1) * np.ones((n, 1, 2, 2), np.int32)
    make_store(skipped, manifest, scores, classes, split_keys(root, "train"), valid)
    assert (skipped / "scores" / "c" / "1" / "0" / "0" / "0").is_file() and (skipped / "valid" / "c" / "1").is_file()
    check_matches(open_store(skipped), manifest, "train")


def test_a_store_replaced_while_read_stops_the_reader(dataset):
    root, files, store = dataset
    reader = open_store(store)
    in_a_worker = pickle.loads(pickle.dumps(reader))  # as a DataLoader worker gets it: the opened store's id
    data = StudentData(root, store, plain())
    reader.read_rows(*reader.shard_rows(0))
    first = reader.dump_id
    import_lvvit(files, store, root, input_size=64, overwrite=True)  # another import over it, the same files
    now = open_store(store).dump_id
    assert now != first
    replaced = f"{store} was replaced while this run read it (dump id {first}, now {now}); restart the run"
    for opened in (reader, in_a_worker):
        with pytest.raises(UserError) as refused:
            opened.read_rows(*opened.shard_rows(1))
        assert str(refused.value) == replaced
    with pytest.raises(UserError) as refused:  # the student's data path, read in a real worker process
        next(iter(DataLoader(data, batch_size=4, num_workers=1)))
    assert one_line(refused.value) == replaced
    StudentData(root, store, plain())  # a new run opens the new store


def test_publishing_and_writing_a_store_is_atomic_and_durable(dataset, tmp_path):
    """strace of an import over an existing store: each shard's chunk files are fsynced before its done flag is
    written; `complete` is written after every done flag is fsynced; the new store is fsynced, then renamed in
    after the old one was renamed aside, and nothing under the store's own path is ever deleted."""
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    root, files, store = dataset
    code = ("import sys; from pathlib import Path; from dump.lvvit import import_lvvit; "
            "import_lvvit(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), input_size=64, overwrite=True)")
    trace = tmp_path / "trace"
    run = subprocess.run(["strace", "-f", "-qq", "-y", "-e", "signal=none", "-o", str(trace), "-e",
                          "trace=fsync,rename,renameat,renameat2,unlink,unlinkat,rmdir",
                          sys.executable, "-c", code, str(files), str(store), str(root)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    calls = [line.split(" ", 1)[-1] if line.startswith("[pid") or line[0].isdigit() else line
             for line in trace.read_text().splitlines()]
    tmp = re.escape(f"{store}.partial-")

    def first(pattern: str, after: int = 0) -> int:
        return next(i for i, call in enumerate(calls) if i >= after and re.search(pattern, call))

    def last(pattern: str) -> int:
        return max(i for i, call in enumerate(calls) if re.search(pattern, call))

    flags_durable = []
    for shard in (0, 1):
        done = first(rf'rename\w*\(.*"{tmp}\d+/done/c/{shard}"')
        for chunk in (f"scores/c/{shard}/0/0/0", f"classes/c/{shard}/0/0/0", f"keys/c/{shard}", f"valid/c/{shard}",
                      f"shard_sha256/c/{shard}", f"dump_id/c/{shard}"):
            assert first(rf"fsync\(\d+<{tmp}\d+/{chunk}>\)") < done, chunk
            assert first(rf"fsync\(\d+<{tmp}\d+/{chunk.split('/')[0]}/c>\)") < done, chunk
        flags_durable.append(first(rf"fsync\(\d+<{tmp}\d+/done/c/{shard}>\)", after=done))
    complete = last(rf'rename\w*\(.*"{tmp}\d+/zarr.json"')
    assert complete > max(flags_durable)
    aside = first(rf'rename\w*\(.*"{re.escape(str(store))}", .*"{re.escape(str(store))}.replaced-')
    moved_in = first(rf'rename\w*\(.*"{tmp}\d+", .*"{re.escape(str(store))}"\)')
    assert complete < last(rf"fsync\(\d+<{tmp}\d+/scores/zarr.json>\)") < aside < moved_in
    under_store = re.compile(rf'(unlink|rmdir)\w*\(.*(<|"){re.escape(str(store))}[/>"]')
    assert not [call for call in calls if under_store.search(call)]
    assert open_store(store).attrs["complete"] and not list(store.parent.glob("maps.zarr.*"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import timm

    import labeler  # noqa: F401  (registers the demo FAN)
    from core.checkpoint import save_checkpoint

    model = timm.create_model("fan_demo_tiny_p8", num_classes=10)
    path = tmp_path_factory.mktemp("run") / "last.pt"
    save_checkpoint(path, model_name="fan_demo_tiny_p8", num_classes=10, img_size=64, model=model, ema=model)
    return path


def test_dump_overwrite_replaces_only_a_label_store(dataset, checkpoint, tmp_path):
    root, _, _ = dataset
    foreign = zarr.open_group(tmp_path / "foreign.zarr", mode="w", attributes={"format": "someone-else"})
    foreign.create_array("data", shape=(4,), dtype="int32")[:] = 7
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    run = cli("dump.dump_labels", "--shards", root, "--checkpoint", checkpoint, "--out", tmp_path / "foreign.zarr",
              "--engine", "local", "--overwrite")
    assert_one_line(run, "foreign.zarr: exists and is a Zarr group not written by tokenlabel; not replacing it")
    assert (zarr.open_group(tmp_path / "foreign.zarr", mode="r")["data"][:] == 7).all()
    for out, message in [(tmp_path / "notes", "notes: exists and is not a label store"),
                         (root, "is, holds or sits inside --shards"),
                         (checkpoint.parent, "is, holds or sits inside --checkpoint")]:
        with pytest.raises(UserError, match=message):
            dump(root, checkpoint, out, engine="local", overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me" and checkpoint.is_file()
    assert split_keys(root, "train") and load_manifest(root).count("train") == TRAIN


def test_export_overwrite_replaces_only_our_export(dataset, tmp_path):
    root, files, store = dataset
    tars = sorted(p.name for p in root.glob("*.tar"))
    run = cli("dump.lvvit", "export", store, root, "--overwrite")  # DIR = the dataset folder
    assert_one_line(run, f"DIR {root}: is, holds or sits inside")
    assert sorted(p.name for p in root.glob("*.tar")) == tars and open_store(store).attrs["complete"]
    with pytest.raises(UserError, match="is, holds or sits inside STORE"):
        export_lvvit(store, store, overwrite=True)
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "results.csv").write_text("keep me")
    with pytest.raises(UserError, match=rf"holds files that are not a tokenlabel export of LV-ViT files \(no {MARKER}"):
        export_lvvit(store, tmp_path / "theirs", overwrite=True)
    assert (tmp_path / "theirs" / "results.csv").read_text() == "keep me"
    out = tmp_path / "export"
    assert export_lvvit(store, out) == (TRAIN, 0)
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "lvvit-export" and marker["dump_id"] == open_store(store).dump_id
    (out / "stale.pt").write_bytes(b"from the earlier export")
    with pytest.raises(UserError, match="folder is not empty; pass --overwrite"):
        export_lvvit(store, out)
    assert export_lvvit(store, out, overwrite=True) == (TRAIN, 0)  # our own export: replaced whole
    assert not (out / "stale.pt").exists() and len(list(out.rglob("*.pt"))) == TRAIN
    (tmp_path / "empty").mkdir()
    export_lvvit(store, tmp_path / "empty")
    # import --overwrite replaces a label store, nothing else
    zarr.open_group(tmp_path / "foreign.zarr", mode="w", attributes={"format": "someone-else"})
    with pytest.raises(UserError, match="STORE .*foreign.zarr: exists and is a Zarr group not written by tokenlabel"):
        import_lvvit(files, tmp_path / "foreign.zarr", root, overwrite=True)
    with pytest.raises(UserError, match="is, holds or sits inside --shards"):
        import_lvvit(files, root, root, overwrite=True)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def crafted_shards(root: Path, keys: list[str]) -> Path:
    """A shard folder whose one train tar (built with tarfile) holds these member names, listed by its manifest."""
    root.mkdir()
    with tarfile.open(root / "train-000000.tar", "w") as tar:
        for key in keys:
            image = io.BytesIO()
            Image.new("RGB", (8, 8)).save(image, format="PNG")
            for ext, data in (("png", image.getvalue()), ("cls", b"0")):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    shards = [{"file": "train-000000.tar", "count": len(keys), "sha256": sha256_of(root / "train-000000.tar")}]
    split = {"shards": shards, "count": len(keys), "digest": keys_digest(keys), "content_digest": content_digest(shards),
             "masks": 0}
    write_manifest(root, ["0", "1"], {"train": split})
    return root


@pytest.mark.parametrize("bad", ["a/../../ESCAPED", "/ABSOLUTE"])
def test_keys_that_would_leave_the_folder_are_refused(tmp_path, make_store, bad):
    bad = str(tmp_path / "ABSOLUTE") if bad == "/ABSOLUTE" else bad
    keys = ["0/fine", bad]
    root = crafted_shards(tmp_path / "crafted", keys)
    store = tmp_path / "crafted.zarr"
    make_store(store, load_manifest(root), np.zeros((2, 1, 1, 1)), np.zeros((2, 1, 1, 1)), keys)
    out = tmp_path / "deep" / "export"
    refused = rf"crafted.zarr: row 1: key '{re.escape(bad)}' (is an absolute path|has an empty, '.' or '..')"
    with pytest.raises(UserError, match=refused):
        export_lvvit(store, out)
    assert not out.exists() and not list(tmp_path.rglob("*.pt"))  # before: deep/ESCAPED.pt, or the absolute path
    assert not list(out.parent.glob("export.partial-*"))
    files = tmp_path / "files"
    (files / "0").mkdir(parents=True)
    with pytest.raises(UserError, match=rf"train-000000.tar: key '{re.escape(bad)}' (is an absolute|has an empty)"):
        import_lvvit(files, tmp_path / "imported.zarr", root)
