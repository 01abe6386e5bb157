"""The shard set's manifest: class names, per-split shard files with sample counts, and a digest of the keys."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "tokenlabel-shards"


def keys_digest(keys: list[str]) -> str:
    """sha256 of the ordered key list: two datasets share a digest only if they hold the same keys in the same order."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    root: Path
    classes: list[str]
    has_masks: bool
    splits: dict[str, dict]
    hflip: bool = True  # mirrored images keep their class, so training may flip them (not so for digits)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> dict:
        if split not in self.splits:
            raise UserError(f"{self.root / MANIFEST}: no split '{split}' (has: {', '.join(self.splits)})")
        return self.splits[split]

    def shards(self, split: str) -> list[tuple[str, int]]:
        """(file name, sample count) of each shard of the split, in order."""
        return [(s["file"], s["count"]) for s in self.split(split)["shards"]]

    def count(self, split: str) -> int:
        return self.split(split)["count"]

    def digest(self, split: str) -> str:
        return self.split(split)["digest"]

    def content_digest(self, split: str) -> str:
        """"sha256:<hex>" of the split's shard files' bytes, in order (the manifest's, where it records one)."""
        recorded = self.split(split).get("content_digest")
        if recorded is not None:
            return recorded
        digest = hashlib.sha256()
        for name, _ in self.shards(split):
            with open(self.root / name, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        return "sha256:" + digest.hexdigest()

    def offsets(self, split: str) -> list[int]:
        """Row of each shard's first sample in the split's order."""
        rows, total = [], 0
        for _, count in self.shards(split):
            rows.append(total)
            total += count
        return rows


def write_manifest(root: Path, classes: list[str], has_masks: bool, splits: dict[str, dict],
                   hflip: bool = True) -> None:
    doc = {"format": FORMAT, "version": 1, "classes": classes, "has_masks": has_masks, "hflip": hflip,
           "splits": splits}
    tmp = root / (MANIFEST + ".partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(root / MANIFEST)


def load_manifest(root: str | Path) -> Manifest:
    """Read and check DIR/manifest.json; every problem is one line naming the file and the fix."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"{root}: no such shard directory; build it with `python -m shards.demo` or `python -m shards.build`")
    if not path.is_file():
        raise UserError(f"{path}: missing; this folder was not written by shards.build/shards.demo (or the build did not finish)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); rebuild the shards") from e
    if doc.get("format") != FORMAT:
        raise UserError(f"{path}: format is {doc.get('format')!r}, expected {FORMAT!r}")
    for field in ("classes", "splits", "has_masks"):
        if field not in doc:
            raise UserError(f"{path}: missing field '{field}'; rebuild the shards")
    for name, split in doc["splits"].items():
        counts = [s["count"] for s in split["shards"]]
        if sum(counts) != split["count"]:
            raise UserError(f"{path}: split '{name}' counts {split['count']} samples but its shards sum to {sum(counts)}")
        missing = [s["file"] for s in split["shards"] if not (root / s["file"]).is_file()]
        if missing:
            raise UserError(f"{root / missing[0]}: shard listed in the manifest is missing ({len(missing)} missing in split '{name}')")
    return Manifest(root, doc["classes"], doc["has_masks"], doc["splits"], doc.get("hflip", True))
