"""Labelers beyond FAN-TL and their geometry: any timm classifier applied at every position, the demo CNN trained by
labeler.train and dumped, a labeler made from a local weights file, and maps that move exactly with a flip."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import labeler  # noqa: F401  (registers the FAN models and the demo CNN)
from common.errors import UserError
from core.checkpoint import save_checkpoint
from core.imaging.boxes import shifted
from core.imaging.device import normalise
from core.imaging.pil import labeler_input
from dump.dump_labels import dump
from dump.store.reader import open_store
from dump.store.schema import footprint_box, make_footprint
from labeler.dense import DenseClassifier, build_labeler
from labeler.load import load_labeler
from labeler.receptive import input_shift, token_geometry
from labeler.train import main as train_main
from shards.build import build


@pytest.mark.parametrize("name, size, stride, centre", [
    ("fan_demo_tiny_p8", 64, 8, 0.5),        # 3x3 stride-2 convs with padding 1: off-centre
    ("fan_demo_hybrid_p8", 64, 8, 4.0),      # patchify convs: centred
    ("cnn_demo_s8", 64, 8, 4.0),
    ("vit_tiny_patch16_224", 224, 16, 8.0),
])
def test_token_geometry_of_each_family(name, size, stride, centre):
    geometry = token_geometry(build_labeler(name, 10), size)
    assert geometry == {"stride": stride, "centre": centre}
    assert input_shift(geometry) == stride / 2 - centre


def test_a_cnn_head_applied_at_every_position_is_a_1x1_convolution():
    """LV-ViT's NFNet maps: the Linear classifier as a 1x1 conv over the features; its mean is the class logits."""
    model = build_labeler("cnn_demo_s8", 10).eval()
    assert isinstance(model, DenseClassifier)
    x = torch.randn(2, 3, 64, 64)
    cls, dense, grid = model.forward_dense(x)
    features = model.model.forward_features(x)
    conv = torch.einsum("bchw,kc->bhwk", features, model.model.fc.weight) + model.model.fc.bias
    torch.testing.assert_close(dense, conv.reshape(2, 64, 10), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense.mean(1), cls, rtol=1e-5, atol=1e-5)
    assert grid == (8, 8)


def test_a_vit_head_on_every_patch_token():
    model = build_labeler("vit_tiny_patch16_224", 5).eval()
    x = torch.randn(1, 3, 224, 224)
    _, dense, grid = model.forward_dense(x)
    tokens = model.model.forward_features(x)[:, 1:]
    torch.testing.assert_close(dense, model.model.head(model.model.fc_norm(tokens)))
    assert grid == (14, 14)


def symmetric(model: nn.Module) -> nn.Module:
    """`model` made mirror-symmetric: every convolution kernel averaged with its left-right mirror and FAN's
    positional encoding off, so its output on a mirrored input is its mirrored output where its token lattice
    is mirror-symmetric. Its BatchNorm statistics are then set on random images and its heads scaled up, so that
    its maps vary visibly from cell to cell."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
        if hasattr(model, "pos_embed"):
            model.pos_embed.token_projection.weight.zero_()
            model.pos_embed.token_projection.bias.zero_()
        model.train()
        for _ in range(10):
            model(torch.randn(8, 3, 64, 64))
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.out_features == 2:  # the class and dense heads
                module.weight.mul_(20)
    return model.eval()


@pytest.mark.parametrize("name", ["fan_demo_hybrid_p8", "cnn_demo_s8"])
def test_maps_of_mirrored_images_are_the_mirrored_maps(name, tmp_path):
    """Real dumps of PNG images (72x64: the centre crop leaves margins) and of their mirrors: with a mirror-symmetric
    labeler, each mirrored image's map is the original's map mirrored, cell for cell (labelers whose token lattice
    is centred on its cells)."""
    torch.manual_seed(0)
    model = symmetric(build_labeler(name, 2))
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 1)):
        for i in range(count):
            coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((72, 64), Image.BICUBIC)
            pixels = np.clip(np.asarray(coarse) + rng.normal(0, 20, (64, 72, 3)), 0, 255).astype(np.uint8)
            for folder, image in (("a", pixels), ("b", pixels[:, ::-1])):  # two classes: images, mirrors
                path = tmp_path / "images" / split / folder / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(image)).save(path)
    build(tmp_path / "images", tmp_path / "shards", per_shard=8, seed=None, overwrite=False)
    checkpoint = tmp_path / "last.pt"
    save_checkpoint(checkpoint, model_name=name, num_classes=2, img_size=64, model=model, ema=model)
    dump(tmp_path / "shards", checkpoint, tmp_path / "labels.zarr", topk=2, batch_size=8, engine="local")
    store = open_store(tmp_path / "labels.zarr")
    keys = store.keys.tolist()
    scores, classes = store.read_rows(0, store.num_rows)
    logits = np.zeros(scores.shape, np.float32)  # top-2 of 2 classes: every class's logit, by class id
    np.put_along_axis(logits, classes.astype(np.int64), scores.astype(np.float32), axis=1)
    for i in range(4):
        a, b = keys.index(f"a/{i}"), keys.index(f"b/{i}")
        assert np.abs(logits[a] - logits[a][..., ::-1]).max() > 0.05  # a map that a mirror changes
        np.testing.assert_allclose(logits[b], logits[a][..., ::-1], atol=1e-2)
    assert store.attrs["footprint"]["shift"] == 0.0 and store.attrs["labeler"]["token_centre"] == 4.0


def test_fan_vit_tokens_sit_on_their_cells_only_with_the_dump_shift():
    """FAN-ViT's stem centres token c at 8 c + 0.5: the dump renders its view shifted by 3.5 px, and then the stem's
    tokens of a mirrored image are the mirrored tokens (those whose receptive field stays inside the view: not the
    first column, which reads the stem's zero padding, nor its partner, the last). Without the shift they are not."""
    torch.manual_seed(0)
    model = symmetric(build_labeler("fan_demo_tiny_p8", 2))
    shift = input_shift(token_geometry(model, 64))
    assert shift == 3.5
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 72, 3), dtype=np.uint8))
    mirror = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    def tokens(view_shift: float) -> torch.Tensor:
        footprint = make_footprint(64, shift=view_shift)
        views = [labeler_input(im, shifted(footprint_box(footprint, 72, 64), view_shift, 64), 64, fill=(124, 116, 104))
                 for im in (image, mirror)]
        x = normalise(torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2), (0.5,) * 3, (0.5,) * 3)
        with torch.no_grad():
            embedded, grid = model.patch_embed(x)
        return embedded.view(2, *grid, -1)

    aligned = tokens(shift)
    torch.testing.assert_close(aligned[1, :, 1:7], aligned[0, :, 1:7].flip(1), rtol=1e-4, atol=1e-4)
    naive = tokens(0.0)
    assert not torch.allclose(naive[1, :, 1:7], naive[0, :, 1:7].flip(1), atol=1e-2)


def test_the_demo_cnn_trains_as_a_labeler_and_dumps(demo_shards, tmp_path, ray_cluster):
    out = tmp_path / "cnn"
    train_main(["--shards", str(demo_shards), "--model", "cnn_demo_s8", "--epochs", "1", "--out", str(out),
                "--batch-size", "8", "--workers", "0"])
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["epoch"] == 1 and {"label_target_acc", "label_other_acc", "label_background_image_class"} <= set(row)
    assert row["train_loss_cls"] > 0 and row["train_samples"] == 16  # cls weight 0 for a CNN: logged, not trained
    dump(demo_shards, out / "last.pt", tmp_path / "cnn.zarr", topk=5, batch_size=4)
    store = open_store(tmp_path / "cnn.zarr")
    assert store.grid == (8, 8) and store.attrs["labeler"]["model"] == "cnn_demo_s8"
    assert store.attrs["footprint"]["shift"] == 0.0


def test_a_labeler_from_a_local_weights_file_without_training(demo_shards, tmp_path):
    """`--pretrained-file` with `--epochs 0`: the checkpoint holds exactly the file's weights, evaluated once."""
    torch.manual_seed(3)
    source = timm.create_model("cnn_demo_s8", num_classes=10).eval()
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    out = tmp_path / "pretrained"
    train_main(["--shards", str(demo_shards), "--model", "cnn_demo_s8", "--epochs", "0", "--out", str(out),
                "--pretrained-file", str(tmp_path / "weights.safetensors"), "--workers", "0", "--batch-size", "8"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0] and "label_other_acc" in rows[0]
    model, meta = load_labeler(out / "last.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert meta["kind"] == "labeler"
    with pytest.raises(UserError, match="not weights of"):
        build_labeler("fan_demo_tiny_p8", 10, tmp_path / "weights.safetensors")
    with pytest.raises(SystemExit):
        train_main(["--shards", str(demo_shards), "--model", "cnn_demo_s8", "--epochs", "0", "--out",
                    str(tmp_path / "x")])
