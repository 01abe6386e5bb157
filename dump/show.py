"""Picture one sample's token labels: `python -m dump.show STORE --key KEY --out PNG [--shards DIR]`
(or `--first N --out FOLDER`: the store's first N labelled samples, one PNG each).

Three panels, as in the STL paper's figure 2: the original image (with the map's footprint outlined when it
is not the whole image), the top-1 class of every token over the image (one colour per class, legend with the
manifest's class names), and the confidence map (the top-1 softmax probability over the stored top-k).
"""

import argparse
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from PIL import Image

from common.errors import UserError, cli
from dump.store.checks import examples, open_matching
from dump.store.reader import SHARDS_HELP, LabelStore
from dump.store.schema import footprint_box
from shards.manifest import Manifest
from shards.reader import read_shard


def find_row(store: LabelStore, key: str) -> int:
    rows = np.flatnonzero(store.keys == key)
    if not len(rows):
        near = [k for k in store.keys.tolist() if k.split("/")[0] == key.split("/")[0]]
        raise UserError(f"{store.path}: no key {key!r} (e.g. {examples(near or store.keys.tolist())})")
    return int(rows[0])


def load_image(shards: Path, store: LabelStore, row: int) -> tuple[Image.Image, int]:
    """The sample's original image and ground-truth class, read from its tar shard."""
    dataset = store.attrs["dataset"]
    position = next(i for i in range(len(dataset["shards"])) if store.shard_rows(i)[1] > row)
    for sample in read_shard(shards, dataset["split"], dataset["shards"][position][0]):
        if sample["index"] == row:
            return sample["image"], sample["cls"]
    raise UserError(f"{shards}: row {row} not found in {dataset['shards'][position][0]}; the shards changed since the dump")


def class_colours(num_classes: int) -> ListedColormap:
    base = colormaps["tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "hsv"]
    return ListedColormap([base(i if num_classes <= 20 else i / num_classes) for i in range(num_classes)])


def render(image: Image.Image, scores: np.ndarray, classes: np.ndarray, box: tuple[float, float, float, float],
           names: list[str], title: str, out: Path) -> Figure:
    """Draw the three panels for one map (scores/classes [k, H, W]) covering `box` of `image` (its cells tile the
    box: on a non-square box they are not square), save them to `out` and return the figure."""
    logits = scores.astype(np.float32)
    probs = np.exp(logits - logits.max(axis=0))
    confidence = probs[0] / probs.sum(axis=0)
    top1 = classes[0]
    x0, y0, x1, y1 = box
    extent = (x0, x1, y1, y0)
    colours = class_colours(len(names))
    fig = Figure(figsize=(13, 4.8), layout="constrained")  # no pyplot: renders with Agg, no display needed
    axes = fig.subplots(1, 3)
    grey = image.convert("L")  # under the colour maps, so the class colours read clearly
    for ax, background in zip(axes, (image, grey, grey)):
        ax.imshow(background, cmap="gray", vmin=0, vmax=255)
        ax.set_xlim(0, image.width)
        ax.set_ylim(image.height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    if (x0, y0, x1, y1) != (0, 0, image.width, image.height):
        axes[0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linestyle="--"))
    axes[0].set_title("image")
    axes[1].imshow(top1, cmap=colours, vmin=-0.5, vmax=len(names) - 0.5, alpha=0.65, extent=extent,
                   interpolation="nearest")
    axes[1].set_title("top-1 class per token")
    present = sorted(set(top1.ravel().tolist()), key=lambda c: -(top1 == c).sum())
    labels = {c: names[c] if names[c] == str(c) else f"{c}: {names[c]}" for c in present}
    axes[1].legend(handles=[Patch(color=colours(c), label=labels[c]) for c in present[:12]],
                   loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="class", title_fontsize=8)
    shown = axes[2].imshow(confidence, cmap="magma", vmin=0, vmax=1, alpha=0.75, extent=extent,
                           interpolation="nearest")
    axes[2].set_title(f"confidence (top-1 softmax over the top-{len(scores)})")
    fig.colorbar(shown, ax=axes[2], fraction=0.046)
    fig.suptitle(title)
    fig.savefig(out, dpi=110)
    return fig


def show(store_path: Path, key: str, out: Path, shards: Path | None = None) -> Figure:
    return picture(*open_matching(store_path, shards), key, out)


def picture(store: LabelStore, manifest: Manifest, key: str, out: Path) -> Figure:
    """The three panels of one key's map, of a store that fits its shards (`open_matching`)."""
    names = manifest.classes
    row = find_row(store, key)
    if not store.valid()[row]:
        raise UserError(f"{store.path}: {key} was skipped as a corrupt sample during the dump; it has no labels")
    image, cls = load_image(manifest.root, store, row)
    scores, classes = store.read_rows(row, row + 1)
    box = footprint_box(store.footprint, image.width, image.height)
    labeler = store.attrs["labeler"]["model"]
    title = f"{key}   (class {cls}: {names[cls]})   labels: {labeler}, {store.path.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    return render(image, scores[0], classes[0], box, names, title, out)


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path, help="label store (a .zarr folder)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="sample key, e.g. 3/train_000012")
    which.add_argument("--first", type=int, help="the store's first N labelled samples instead (--out is a folder)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write (with --first: a folder of PNGs)")
    parser.add_argument("--shards", type=Path, default=None, help=SHARDS_HELP)
    args = parser.parse_args(argv)
    if args.first is not None and args.first < 1:
        raise UserError(f"--first must be at least 1, got {args.first}")
    store, manifest = open_matching(args.store, args.shards)
    if args.key is not None:
        pictures = {args.key: args.out}
    else:
        keys = store.keys[store.valid().astype(bool)][: args.first].tolist()
        pictures = {key: args.out / f"{key.replace('/', '_')}.png" for key in keys}
    for key, out in pictures.items():
        picture(store, manifest, key, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
