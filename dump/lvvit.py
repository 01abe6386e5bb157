"""LV-ViT interop: export a store to, or import one from, LV-ViT's per-image `.pt` label layout, exactly.

    python -m dump.lvvit export STORE DIR [--shards shards/NAME] [--overwrite]
    python -m dump.lvvit import DIR STORE --shards shards/NAME [--split train --input-size 576 --crop-pct 1.0]

LV-ViT (TokenLabeling's generate_label.py) writes one file per training image, `<class_dir>/<stem>.pt`, holding
a float16 tensor [2, k, H, W]: the top-k scores, then their class ids, also as float16; a map covers the centred
square of the shorter side (crop_pct 1.0). Scores are float16 in both layouts, so they move bit for bit. Class
ids above 2048 cannot be exact in float16: such files are refused, and so is a store holding such an id
(datasets of K <= 2049 classes always round-trip). Reading, checks and safety rules: dump.label_files.
"""

from functools import partial

from common.errors import cli
from dump.label_files import LVVIT, export_files, import_files, run

export_lvvit = partial(export_files, LVVIT)
import_lvvit = partial(import_files, LVVIT)


@cli
def main(argv: list[str] | None = None) -> None:
    run(LVVIT, __doc__, argv)


if __name__ == "__main__":
    main()
