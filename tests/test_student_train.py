"""The student trainer end to end: each family learns, exact resume, DDP, online teacher, every mode, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from PIL import Image

from core.checkpoint import read_checkpoint, save_checkpoint
from core.engine import train_step
from shards.build import build
from shards.demo import build_demo
from train.checkpoint_eval import main as eval_main
from train.mixing import MixInfo, apply_mix, mix_tokens
from train.student import Run, build_parser, check_args, main
from train.targets import class_targets

REPO = Path(__file__).resolve().parents[1]
K = 10
TIME_KEYS = ("train_time", "train_samples_per_s", "time")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def argv(labels: Path, out: Path, *flags: str) -> list[str]:
    """A short CPU run: batch 8 (two steps an epoch) at lr 1e-3, one epoch, no workers, clean final eval; flags override."""
    return ["--labels", str(labels), "--model", "fan_demo_tiny_p8", "--epochs", "1", "--out", str(out),
            "--batch-size", "8", "--lr", "1e-3", "--workers", "0", "--final-corruptions", "none", *flags]


def make_run(*args: str) -> Run:
    parsed = build_parser().parse_args(list(args))
    check_args(parsed)
    return Run(parsed)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def labeler_checkpoint(path: Path, num_classes: int = K, img_size: int = 64) -> Path:
    torch.manual_seed(1)
    model = timm.create_model("fan_demo_tiny_p8", num_classes=num_classes)
    save_checkpoint(path, model_name="fan_demo_tiny_p8", num_classes=num_classes, img_size=img_size, model=model,
                    ema=model)
    return path


@pytest.mark.parametrize("model, lr, flags", [
    ("fan_demo_tiny_p8", "3e-4", []),
    ("vit_tiny_patch16_224", "1e-4", ["--patch-size", "16"]),  # a 4x4 token grid under the store's 8x8 maps
    ("volo_d1_224", "1e-4", []),  # tokens on the stride-16 grid (4x4), MixToken on the stride-8 patch embedding
])
def test_each_student_family_lowers_the_loss(dataset, tmp_path, model, lr, flags):
    _, store = dataset
    # the same full view of each image every epoch and no noise: eight steps must fit the training batch better
    run = make_run(*argv(store, tmp_path, "--model", model, "--epochs", "4", "--lr", lr, "--min-lr", lr,
                         "--warmup-epochs", "0", "--weight-decay", "0", "--drop-path", "0", "--target", "softmax",
                         "--smoothing", "0", "--aa", "none", "--reprob", "0", "--crop-scale", "1", "--hflip", "0",
                         *flags))
    assert run.grid == ((8, 8) if model.startswith("fan") else (4, 4))
    batch = next(iter(run.loader()))
    with torch.no_grad():
        before, parts = run.objective(batch, 0, 0)
    assert set(parts) == {"cls", "token"}
    run.run()
    with torch.no_grad():
        after, _ = run.objective(batch, 0, 0)
    assert after < 0.9 * before, (model, float(before), float(after))
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    assert read_checkpoint(tmp_path / "last.pt")["train_state"]["step"] == 8
    assert {"top1", "top1_combined", "label_other_acc"} <= set(json.loads((tmp_path / "eval.json").read_text()))


def test_resume_reproduces_the_uninterrupted_run(dataset, tmp_path):
    _, store = dataset
    flags = ["--epochs", "2", "--mix", "cutmix", "--target", "gumbel", "--drop-path", "0.1"]
    main(argv(store, tmp_path / "straight", *flags))
    main(argv(store, tmp_path / "resumed", *flags, "--stop-after", "1"))
    assert len(metrics(tmp_path / "resumed")) == 1 and not (tmp_path / "resumed" / "eval.json").exists()
    main(argv(store, tmp_path / "resumed", *flags, "--workers", "1"))  # workers do not change a sample

    a, b = (read_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "resumed"))
    assert a["train_state"]["step"] == b["train_state"]["step"] == 4
    for name in ("state_dict", "ema"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert without_times(metrics(tmp_path / "straight")) == without_times(metrics(tmp_path / "resumed"))
    straight, resumed = ({k: v for k, v in json.loads((tmp_path / run / "eval.json").read_text()).items()
                          if k != "checkpoint"} for run in ("straight", "resumed"))
    assert straight == resumed


def test_resume_refuses_changed_flags(dataset, tmp_path, capsys):
    _, store = dataset
    main(argv(store, tmp_path, "--epochs", "2", "--stop-after", "1", "--max-steps", "1"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv(store, tmp_path, "--epochs", "2", "--max-steps", "1", "--lr", "0.01"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'last.pt'}: trained with --lr 0.001, this run has 0.01; resume with the checkpoint's "
        "flags (1 differ) or use another --out"]


def test_ddp_first_step_matches_one_process_on_the_global_batch(dataset, tmp_path):
    """torchrun, gloo, 2 CPU processes of batch 8 (one train shard each) vs one process of batch 16: one step.

    Each sample's augmentation is seeded by its row, so both runs see the same 16 views; nothing else draws
    (no mixing, soft targets, no drop-path), and without RandAugment's rotations every token is valid, so the
    mean of the two ranks' losses is the loss of the global batch."""
    _, store = dataset
    flags = ["--model", "vit_tiny_patch16_224", "--patch-size", "16", "--max-steps", "1", "--mix", "none",
             "--target", "softmax", "--drop-path", "0", "--aa", "none", "--opt", "sgd", "--lr", "0.1",
             "--warmup-epochs", "0", "--weight-decay", "0"]
    on_two_ranks(argv(store, tmp_path / "ddp", *flags))
    main(argv(store, tmp_path / "one", *flags, "--batch-size", "16"))

    (ddp,), (one,) = metrics(tmp_path / "ddp"), metrics(tmp_path / "one")
    for key in ("train_loss", "train_loss_cls", "train_loss_token"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-5), key
    assert ddp["top1"] == one["top1"]
    initial = make_run(*argv(store, tmp_path / "init", *flags)).student.state_dict()
    a, b = (read_checkpoint(tmp_path / run / "last.pt")["state_dict"] for run in ("ddp", "one"))
    for key in a:  # SGD: the update is linear in the gradient, so DDP's averaged gradient must match closely
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    assert sum(float((a[key] - initial[key]).abs().sum()) for key in a) > 1.0


def on_two_ranks(*runs: list[str]) -> None:
    """train.student runs side by side, each under torchrun: 2 CPU processes (gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launches = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  "2", "-m", "train.student", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for args in runs]
    for launch in launches:
        _, err = launch.communicate(timeout=120)
        assert launch.returncode == 0, err[-3000:]


def test_one_shard_trains_on_two_ranks_of_two_workers_and_resumes_bitwise(one_shard_dataset, tmp_path):
    """One train shard of 16 on 2 ranks x 2 DataLoader workers, batch 4: samples are split within the shard, so
    each rank takes 2 steps an epoch and the epoch sees all 16 samples; a run stopped after its first epoch and
    resumed ends bitwise equal to the uninterrupted one."""
    _, store = one_shard_dataset
    flags = ["--epochs", "2", "--batch-size", "4", "--workers", "2", "--mix", "cutmix", "--drop-path", "0.1"]
    on_two_ranks(argv(store, tmp_path / "straight", *flags), argv(store, tmp_path / "resumed", *flags, "--stop-after", "1"))
    on_two_ranks(argv(store, tmp_path / "resumed", *flags))
    records = without_times(metrics(tmp_path / "straight"))
    assert [(r["world_size"], r["train_samples"]) for r in records] == [(2, 16), (2, 16)]
    assert records == without_times(metrics(tmp_path / "resumed"))
    a, b = (read_checkpoint(tmp_path / run / "last.pt") for run in ("straight", "resumed"))
    assert a["train_state"]["step"] == b["train_state"]["step"] == 4
    for name in ("state_dict", "ema"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def test_online_labeler_makes_the_targets_without_a_store(tmp_path):
    root = tmp_path / "bare"  # a dataset with no labels/ folder at all
    build_demo(root, train=16, val=8, per_shard=8)
    ckpt = labeler_checkpoint(tmp_path / "labeler.pt")
    run = make_run(*argv(root, tmp_path / "run", "--online-labeler", str(ckpt), "--model", "vit_tiny_patch16_224",
                         "--patch-size", "8", "--target", "softmax", "--smoothing", "0", "--aa", "none",
                         "--color-jitter", "0", "--reprob", "0"))
    assert run.train_data.store is None and run.grid == (8, 8)
    batch = next(iter(run.loader()))
    assert torch.equal(batch["clean"], batch["image"])  # no photometric op: the teacher sees the student's view
    _, tokens, valid = run.objective.targets(batch)
    with torch.no_grad():
        _, logits, grid = run.labeler.forward_dense(batch["clean"])
    expected = logits.softmax(-1).transpose(1, 2).unflatten(2, grid)
    assert valid.all() and torch.allclose(tokens, expected, atol=1e-6)

    small = labeler_checkpoint(tmp_path / "labeler32.pt", img_size=32)  # sees a 32 px view, a 4x4 grid
    assert next(iter(make_run(*argv(root, tmp_path / "run", "--online-labeler", str(small), "--img-size", "64"))
                     .loader()))["clean"].shape[-2:] == (32, 32)
    main(argv(root, tmp_path / "cli", "--online-labeler", str(small), "--img-size", "64", "--model",
              "vit_tiny_patch16_224", "--patch-size", "16", "--max-steps", "1"))
    (record,) = metrics(tmp_path / "cli")
    assert np.isfinite(record["train_loss_token"]) and record["train_loss_token"] > 0


@pytest.mark.parametrize("flags", [
    ["--tl-align", "paper"],
    ["--tl-align", "dense"],
    ["--tl-align", "dense", "--mix", "mixtoken"],
    ["--tl-align", "paper", "--mix", "cutmix"],
    ["--mix", "mixtoken"],
    ["--mix", "cutmix"],
    ["--mix", "mixup"],
    ["--mix", "both"],
    ["--target", "argmax"],
    ["--target", "softmax"],
    ["--target", "gumbel", "--tau", "0.5"],
    ["--map-weight", "0.5", "--clip-grad", "1.0"],
    ["--no-token-labels"],
    ["--no-token-labels", "--mix", "mixtoken"],
    ["--no-token-labels", "--tl-align", "paper"],
], ids=" ".join)
def test_each_mode_takes_a_step(dataset, tmp_path, flags):
    _, store = dataset
    run = make_run(*argv(store, tmp_path, "--model", "vit_tiny_patch16_224", "--patch-size", "16", *flags))
    before = [p.detach().clone() for p in run.student.parameters()]
    parts = train_step(run.objective, run.optim, next(iter(run.loader())), 0, 0)
    assert all(np.isfinite(v) for v in parts.values())
    assert ("loss_token" in parts) == ("--no-token-labels" not in flags)
    assert any(not torch.equal(a, b) for a, b in zip(before, run.student.parameters()))


def test_a_store_outside_its_dataset_trains_from_its_record_or_shards(dataset, tmp_path, capsys):
    root, store = dataset
    elsewhere = tmp_path / "stores" / "maps.zarr"
    shutil.copytree(store, elsewhere)
    assert make_run(*argv(elsewhere, tmp_path / "a")).shards == root.resolve()
    assert make_run(*argv(elsewhere, tmp_path / "b", "--shards", str(root))).shards == root
    group = zarr.open_group(elsewhere, mode="r+")
    group.attrs["dataset"] = {**group.attrs["dataset"], "root": str(tmp_path / "gone")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv(elsewhere, tmp_path / "c"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {elsewhere}: no manifest.json in {tmp_path / 'gone'} (the dataset it records); pass --shards DIR"]
    main(argv(elsewhere, tmp_path / "d", "--shards", str(root), "--max-steps", "1"))
    assert [r["epoch"] for r in metrics(tmp_path / "d")] == [1]


def other_class_count_dataset(root: Path) -> Path:
    """A 3-class ImageFolder built into shards, holding a copy of a 10-class store."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in "abc":
            (root / "folder" / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "folder" / split / c / "0.png")
    build(root / "folder", root / "shards", per_shard=8, seed=0, overwrite=False)
    return root / "shards"


def test_one_line_errors(dataset, tmp_path, capsys):
    root, store = dataset
    three = other_class_count_dataset(tmp_path / "three")
    (three / "labels").mkdir()
    os.symlink(store, three / "labels" / "maps.zarr")
    swapped = tmp_path / "swapped.zarr"  # its attributes match the shards, its keys array does not
    shutil.copytree(store, swapped)
    keys = zarr.open_group(swapped, mode="r+")["keys"]
    keys[0:2] = np.array([str(keys[1]), str(keys[0])])
    cases = [
        (main, argv(store, tmp_path / "a", "--model", "vit_nope_patch16"), "unknown model 'vit_nope_patch16'"),
        (main, argv(store, tmp_path / "b", "--resume", str(tmp_path / "missing.pt")), "checkpoint not found"),
        (main, argv(root, tmp_path / "c", "--online-labeler", str(tmp_path / "missing.pt")), "checkpoint not found"),
        (main, argv(three / "labels" / "maps.zarr", tmp_path / "d"), "the store has 10 classes, the shards 3"),
        (main, argv(root, tmp_path / "e", "--online-labeler", str(labeler_checkpoint(tmp_path / "k3.pt", 3))),
         "labeler has 3 classes, the shards 10"),
        (main, argv(store, tmp_path / "f", "--final-corruptions", "fog", "fgo"), "unknown corruption 'fgo'"),
        (main, argv(store, tmp_path / "g", "--batch-size", "17"), "fewer than --batch-size 17"),
        (main, argv(swapped, tmp_path / "h"), "the store's keys array does not list the shards' keys"),
        (main, argv(store, tmp_path / "i", "--img-size", "70"),
         "img_size 70x70 is not a multiple of the FAN student's stride 8x8"),
        (eval_main, [str(tmp_path / "missing.pt"), "--shards", str(root)], "checkpoint not found"),
    ]
    capsys.readouterr()
    for command, args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            command(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2, args
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
    assert not (tmp_path / "i").exists()  # refused before anything was built or written


@pytest.mark.parametrize("form", ["paper", "dense"])
def test_tl_align_under_mixtoken_starts_from_the_labels_of_what_each_token_shows(dataset, tmp_path, form):
    """MixToken moves the box's tokens to the partner: TL-Align's starting labels must describe the tokens the
    model sees, mixed once. Paper form: each token's source-image label (the box gives the partner's; mixing those
    again would undo it). Dense form: the token maps moved with their tokens, a quarter of them without a label."""
    _, store = dataset
    run = make_run(*argv(store, tmp_path, "--model", "vit_tiny_patch16_224", "--patch-size", "16", "--drop-path", "0",
                         "--tl-align", form, "--mix", "mixtoken", "--target", "softmax"))
    objective, batch = run.objective, next(iter(run.loader()))
    info = MixInfo("mixtoken", 1 - 4 / 16, (0, 2, 1, 3), run.grid)
    cls_t, tok_t, valid = objective.targets(batch)
    cls_t = apply_mix(info, batch["image"], cls_t)[1]
    tok_t, valid = tok_t.flatten(2).transpose(1, 2), valid.flatten(1) & (torch.arange(16) % 4 > 0)
    with torch.no_grad():
        _, _, aligned = objective.forward(batch["image"], batch["cls"], cls_t, tok_t, valid, info)
        if form == "paper":
            source = info.source(len(batch["cls"])).flatten(1)
            assert not torch.equal(source, mix_tokens(source.unsqueeze(-1), info).squeeze(-1))
            start, start_valid = class_targets(batch["cls"], K, 0.1)[source], None
        else:
            start, start_valid = mix_tokens(tok_t, info), mix_tokens(valid.unsqueeze(-1), info).squeeze(-1)
        with objective.aligner.align(cls_t, start, valid=start_valid) as want:
            objective.module(batch["image"], mix=info)
    torch.testing.assert_close(aligned.cls, want.cls, rtol=0, atol=1e-6)
    if form == "dense":  # back in each image's own token order, like the token logits
        torch.testing.assert_close(aligned.tokens, mix_tokens(want.tokens, info), rtol=0, atol=1e-6)


def compiled_matches_eager(dataset, tmp_path, mode: str, flags: list[str]) -> None:
    """A run with --compile MODE trains as the eager run does: the same losses and weights up to rounding."""
    _, store = dataset
    main(argv(store, tmp_path / "eager", *flags))
    main(argv(store, tmp_path / "compiled", *flags, "--compile", mode))
    (eager,), (compiled,) = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    losses = [key for key in eager if key.startswith("train_loss")]
    assert losses and [compiled[key] for key in losses] == pytest.approx([eager[key] for key in losses], rel=1e-4)
    a, b = (read_checkpoint(tmp_path / run / "last.pt")["state_dict"] for run in ("eager", "compiled"))
    assert a.keys() == b.keys()  # torch.compile's wrapper does not leak into the checkpoint
    for key in a:  # AdamW moves a weight by about lr whatever its gradient: one that is 0 up to rounding may go
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=4 * eager["lr"])  # either way (lr: warming up)


@pytest.mark.parametrize("flags", [["--mix", "cutmix", "--drop-path", "0.1"], ["--mix", "mixup", "--target", "softmax",
                                                                               "--no-token-labels"]], ids=" ".join)
def test_compile_captures_whole_graphs_and_trains_as_eager(dataset, tmp_path, flags):
    """--compile aot_eager: dynamo and AOT autograd capture the label path and the loss as whole graphs (fullgraph:
    a graph break fails) and the student's forward, without generating code, so it takes seconds on a CPU."""
    compiled_matches_eager(dataset, tmp_path, "aot_eager", ["--max-steps", "2", *flags])


@pytest.mark.slow
def test_compile_with_inductor_trains_as_eager(dataset, tmp_path):
    """--compile (inductor: generated kernels); minutes on the 2-core CPU for compiling, hence `slow`."""
    compiled_matches_eager(dataset, tmp_path, "default", ["--max-steps", "2", "--target", "softmax", "--mix", "cutmix",
                                                          "--drop-path", "0"])


def test_without_a_store_the_input_size_is_the_models_own(dataset, tmp_path):
    """A baseline on a dataset folder reads no store: the demo FAN trains at its configured 64 px (not 224, which
    would silently upsample the demo's 64 px images), a timm ViT at its 224."""
    root, _ = dataset
    assert make_run(*argv(root, tmp_path / "fan", "--no-token-labels")).img_size == 64
    assert make_run(*argv(root, tmp_path / "vit", "--no-token-labels", "--model", "vit_tiny_patch16_224")).img_size == 224


def test_a_run_without_token_labels_reports_nothing_of_its_untrained_dense_head(dataset, tmp_path):
    """--no-token-labels trains no loss through the per-token head: its checkpoint says so, and neither the
    per-epoch records, eval.json nor train.checkpoint_eval report a score read from its token logits
    (top1_combined would add 0.5 x the max of untrained logits)."""
    root, store = dataset
    main(argv(store, tmp_path / "run", "--no-token-labels", "--max-steps", "1"))
    assert read_checkpoint(tmp_path / "run" / "last.pt")["dense_head_trained"] is False
    eval_main([str(tmp_path / "run" / "last.pt"), "--shards", str(root), "--corruptions", "--out",
               str(tmp_path / "again.json")])
    (record,) = metrics(tmp_path / "run")
    for results in (record, *(json.loads((tmp_path / name).read_text()) for name in ("run/eval.json", "again.json"))):
        assert results["dense_head_trained"] is False and "top1" in results
        assert not {"top1_combined", "top1_pooled", "label_target_acc"} & set(results), sorted(results)
    main(argv(store, tmp_path / "labels", "--max-steps", "1"))
    assert read_checkpoint(tmp_path / "labels" / "last.pt")["dense_head_trained"] is True
    assert {"top1_combined", "top1_pooled", "label_target_acc"} <= set(json.loads((tmp_path / "labels" / "eval.json").read_text()))
