"""ReLabel interop: import a store from, or export one to, ReLabel's per-image `.pt` label maps, exactly.

    python -m dump.relabel import DIR STORE --shards shards/NAME [--split train --input-size 475 --model NAME]
    python -m dump.relabel export STORE DIR [--shards shards/NAME] [--overwrite]

ReLabel (naver-ai/relabel_imagenet) ships one file per training image, `<class_dir>/<stem>.pt`, holding a tensor
[2, 5, 15, 15] (top-5 scores, then their class ids, float16 or float32) from EfficientNet-L2 at 475, made from
the whole image resized to a square: its aspect ratio not kept, so on a W x H image a cell covers W/15 x H/15
pixels. The store records that footprint (crop "whole"), and every reader of the store follows it. float16
files move bit for bit; float32 scores are rounded to the store's float16 (import says by how much); export
writes float16 files when every class id fits (K <= 2049), else float32. Reading, checks and safety rules:
dump.label_files.
"""

from functools import partial

from common.errors import cli
from dump.label_files import RELABEL, export_files, import_files, run

export_relabel = partial(export_files, RELABEL)
import_relabel = partial(import_files, RELABEL)


@cli
def main(argv: list[str] | None = None) -> None:
    run(RELABEL, __doc__, argv)


if __name__ == "__main__":
    main()
