"""Training-step overhead of TL-Align: step time with the aligner (each order) against the same step without it.

    python -m benchmarks.bench_tl_align [--models vit_tiny_patch16_224 fan_demo_tiny_p8 --batch 64 --img 64]

One process, one model at a time; the modes (off, auto, layer, transport) run in a rotating order
every repeat, and the table gives the median step time of each, as process CPU time and as wall
time, and its ratio to "off" (on a shared machine CPU time is the steadier of the two). A step is
forward, soft-target cross-entropy on the class target (the aligned one, or the area-mixed one
when off), backward and an AdamW step, on a token-aligned CutMix batch of random images.
"""

import argparse
import statistics
import time

import timm
import torch

import labeler  # noqa: F401  (registers the FAN models)
from common.errors import cli
from train.tl_align import TokenLabelAligner, alignment_cost, initial_labels_paper

MODES = ("off", "auto", "layer", "transport")


def token_cutmix(images: torch.Tensor, grid: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste one random token-aligned box from the batch-flipped images; returns (images, source map [B, N])."""
    B, _, H, _ = images.shape
    cell = H // grid
    side = int(torch.randint(1, grid, (), generator=generator))
    top, left = (int(v) for v in torch.randint(0, grid - side + 1, (2,), generator=generator))
    source = torch.arange(B)[:, None, None].repeat(1, grid, grid)
    source[:, top:top + side, left:left + side] = source.flip(0)[:, top:top + side, left:left + side]
    mixed = images.clone()
    box = (slice(None), slice(None), slice(top * cell, (top + side) * cell), slice(left * cell, (left + side) * cell))
    mixed[box] = images.flip(0)[box]
    return mixed, source.flatten(1)


def make_model(name: str, img: int, classes: int) -> torch.nn.Module:
    if name.startswith("vit"):
        return timm.create_model(name, img_size=img, patch_size=8, num_classes=classes)
    return timm.create_model(name, num_classes=classes)


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    model = make_model(name, args.img, args.classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    aligner = TokenLabelAligner(model)
    g = torch.Generator().manual_seed(0)
    mixed, source = token_cutmix(torch.randn(args.batch, 3, args.img, args.img, generator=g), args.img // 8, g)
    onehot = torch.nn.functional.one_hot(torch.randint(0, args.classes, (args.batch,), generator=g), args.classes)
    cls0, tok0 = initial_labels_paper(source, onehot.float() * 0.9 + 0.1 / args.classes)

    def step(mode: str) -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if mode == "off":
            logits, target = model(mixed), cls0
        else:
            with aligner.align(cls0, tok0, order=mode) as aligned:
                logits = model(mixed)
            target = aligned.cls
        loss = torch.sum(-target * logits.log_softmax(-1), dim=-1).mean()
        loss.backward()
        optimizer.step()
        return time.process_time() - cpu, time.perf_counter() - wall

    times = {mode: [] for mode in MODES}
    for mode in MODES:
        step(mode)
    for r in range(args.repeats):
        for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
            times[mode].append(step(mode))

    tokens = tok0.shape[1] + aligner.num_prefix - aligner.skip
    layers = len(aligner.self_attns)
    median = {mode: [statistics.median(t) for t in zip(*times[mode])] for mode in MODES}
    rows = []
    for mode in MODES:
        order = aligner.order_for(tok0.shape[1], args.classes) if mode == "auto" else mode
        (cpu, wall), (cpu_off, wall_off) = median[mode], median["off"]
        cost = "" if mode == "off" else f"{alignment_cost(order, tokens, args.classes, layers) / 1e6:.3f}"
        rows.append({"model": name, "mode": mode if mode != "auto" else f"auto={order}", "T": tokens,
                     "L": layers, "cpu_ms": f"{1e3 * cpu:.0f}", "cpu_ratio": f"{cpu / cpu_off:.3f}",
                     "wall_ms": f"{1e3 * wall:.0f}", "wall_ratio": f"{wall / wall_off:.3f}",
                     "label_MMAC/img": cost})
    return rows


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_tiny_patch16_224", "fan_demo_tiny_p8"],
                        help="timm ViT names get img_size=--img and patch 8; FAN demo models their own stride")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per mode (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.img}x{args.img}, K={args.classes}, {args.repeats} repeats, "
          f"{args.threads} thread(s), torch {torch.__version__}, timm {timm.__version__}")
    print_table([row for name in args.models for row in bench_model(name, args)])


if __name__ == "__main__":
    main()
