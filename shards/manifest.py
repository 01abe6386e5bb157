"""The shard set's manifest: class names, per-split shard files with sample counts and sha256s, and key digests.

`python -m shards.manifest upgrade DIR` turns a version-1 manifest (no content digests) into version 2: it
hashes the tars, checks their keys and counts against the manifest, and rewrites manifest.json.
"""

import argparse
import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from webdataset.tariterators import base_plus_ext

from common.errors import UserError, cli
from common.files import atomic_write

MANIFEST = "manifest.json"
FORMAT = "tokenlabel-shards"
VERSION = 2
META = re.compile(r"__[^/]*__($|/)")  # WebDataset's default skip_meta: tar members it never yields


def key_problem(key: str) -> str | None:
    """Why `key` is not a safe sample key (a relative path of plain names whose base name has no dot, so that it
    survives WebDataset's split of member names and is safe as a file path, e.g. LV-ViT's `<key>.pt`), or None."""
    parts = key.split("/")
    if key.startswith("/"):
        return "is an absolute path"
    if "\\" in key or "\0" in key:
        return "contains a backslash or a NUL character"
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' path component"
    if "." in parts[-1]:
        return "has a dot in its base name (WebDataset cuts a member name at its base name's first dot)"
    if META.match(key):
        return "starts with a __name__ folder (WebDataset skips such members as metadata)"
    return None


def check_key(key: str, source: str | Path) -> None:
    """Refuse an unsafe sample key in one line naming where it came from (an image file, a tar, a store)."""
    problem = key_problem(key)
    if problem is not None:
        raise UserError(f"{source}: key {key!r} {problem}; a key must be a relative path of plain names")


def keys_digest(keys: list[str]) -> str:
    """sha256 of the ordered key list: two datasets share a digest only if they hold the same keys in the same order."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def content_digest(shards: list[dict[str, Any]]) -> str:
    """sha256 over a split's ordered (file, count, sha256) shard entries: the same digest means the same bytes."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"{shard['file']}\t{shard['count']}\t{shard['sha256']}\n".encode())
    return "sha256:" + digest.hexdigest()


class Digesting:
    """A binary file whose bytes are hashed (sha256) as they are read or written through it."""

    def __init__(self, file: BinaryIO):
        self.file, self.sha256 = file, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.sha256.update(data)
        return data

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def hexdigest_to_end(self) -> str:
        """The sha256 of the whole file, after reading whatever is left of it."""
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


def shard_members(path: str | Path) -> list[tuple[str, str]]:
    """(key, extension) of each file in a tar, from member headers only (no decoding), as WebDataset splits
    their names; stops where a tar is truncated. An unsafe key is refused naming the tar."""
    members: list[tuple[str, str]] = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if key is not None and member.isreg() and not META.match(member.name):
                    check_key(key, path)
                    members.append((key, ext.lower()))
    except (OSError, EOFError, tarfile.TarError):
        pass
    return members


def distinct_keys(members: list[tuple[str, str]]) -> list[str]:
    """The sample keys of (key, extension) members in order: a sample's files are consecutive in its tar."""
    return [key for i, (key, _) in enumerate(members) if i == 0 or members[i - 1][0] != key]


def shard_keys(path: str | Path) -> list[str]:
    """Sample keys of one tar in order, from member headers only (see shard_members)."""
    return distinct_keys(shard_members(path))


@dataclass(frozen=True)
class Manifest:
    root: Path
    classes: list[str]
    has_masks: bool  # every image of every split has a mask
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

    def shard_digests(self, split: str) -> list[str]:
        """Hex sha256 of each shard file's bytes, in shard order."""
        return [s["sha256"] for s in self.split(split)["shards"]]

    def content_digest(self, split: str) -> str:
        """"sha256:<hex>" over the split's ordered (file, count, sha256) entries: names the split's exact bytes."""
        return self.split(split)["content_digest"]

    def count(self, split: str) -> int:
        return self.split(split)["count"]

    def digest(self, split: str) -> str:
        """"sha256:<hex>" of the split's ordered keys (keys_digest)."""
        return self.split(split)["digest"]

    def offsets(self, split: str) -> list[int]:
        """Row of each shard's first sample in the split's order."""
        rows, total = [], 0
        for _, count in self.shards(split):
            rows.append(total)
            total += count
        return rows


def write_manifest(root: Path, classes: list[str], splits: dict[str, dict], hflip: bool = True) -> None:
    """Publish DIR/manifest.json (atomic and durable); `has_masks` says whether every image has a mask."""
    has_masks = all(split["masks"] == split["count"] for split in splits.values())
    doc = {"format": FORMAT, "version": VERSION, "classes": classes, "has_masks": has_masks, "hflip": hflip,
           "splits": splits}
    atomic_write(root / MANIFEST, json.dumps(doc, indent=1) + "\n")


KINDS = {
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
    "a string": lambda v: isinstance(v, str) and v != "",
    "an integer >= 0": lambda v: type(v) is int and v >= 0,
    "true or false": lambda v: isinstance(v, bool),
    "a sha256 digest": lambda v: isinstance(v, str) and re.fullmatch("sha256:[0-9a-f]{64}", v) is not None,
    "a hex sha256": lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
    "a file name": lambda v: isinstance(v, str) and re.fullmatch(r"[^/\\\0.][^/\\\0]*", v) is not None,
}


def expect(value: Any, kind: str, name: str, path: Path) -> Any:
    """`value` if it is of `kind`, else one line naming the field, e.g. `splits.train.shards[3].count`."""
    if not KINDS[kind](value):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise UserError(f"{path}: {name}: expected {kind}, got {shown}; rebuild the shards")
    return value


def field(doc: dict, key: str, kind: str, where: str, path: Path) -> Any:
    name = f"{where}.{key}" if where else key
    if key not in doc:
        raise UserError(f"{path}: {name}: missing; rebuild the shards")
    return expect(doc[key], kind, name, path)


def check_schema(doc: Any, path: Path, version: int) -> None:
    """Refuse, naming the field, a manifest document that is not what shards.build writes (version 1 lacks the
    per-shard sha256, the split's content_digest and its mask count)."""
    for i, name in enumerate(field(doc, "classes", "a list", "", path)):
        expect(name, "a string", f"classes[{i}]", path)
    if len(set(doc["classes"])) != len(doc["classes"]):
        raise UserError(f"{path}: classes: a class is listed twice; rebuild the shards")
    field(doc, "has_masks", "true or false", "", path)
    if "hflip" in doc:
        field(doc, "hflip", "true or false", "", path)
    files = set()
    for split, entry in field(doc, "splits", "an object", "", path).items():
        where = f"splits.{split}"
        expect(entry, "an object", where, path)
        field(entry, "count", "an integer >= 0", where, path)
        field(entry, "digest", "a sha256 digest", where, path)
        for i, shard in enumerate(field(entry, "shards", "a list", where, path)):
            name = f"{where}.shards[{i}]"
            expect(shard, "an object", name, path)
            if field(shard, "file", "a file name", name, path) in files:
                raise UserError(f"{path}: {name}.file: {shard['file']} is listed twice; rebuild the shards")
            files.add(shard["file"])
            field(shard, "count", "an integer >= 0", name, path)
            if version >= 2:
                field(shard, "sha256", "a hex sha256", name, path)
        if version >= 2:
            if field(entry, "content_digest", "a sha256 digest", where, path) != content_digest(entry["shards"]):
                raise UserError(f"{path}: {where}.content_digest does not match its shard entries; rebuild the shards")
            if field(entry, "masks", "an integer >= 0", where, path) > entry["count"]:
                raise UserError(f"{path}: {where}.masks: {entry['masks']} masks for {entry['count']} images; rebuild the shards")
        counts = sum(s["count"] for s in entry["shards"])
        if counts != entry["count"]:
            raise UserError(f"{path}: split '{split}' counts {entry['count']} samples but its shards sum to {counts}")
    if version >= 2 and doc["has_masks"] != all(s["masks"] == s["count"] for s in doc["splits"].values()):
        raise UserError(f"{path}: has_masks disagrees with the splits' mask counts; rebuild the shards")


def read_document(root: Path) -> dict[str, Any]:
    """DIR/manifest.json parsed, with its format and version checked against what this code reads."""
    path = root / MANIFEST
    if not root.is_dir():
        raise UserError(f"{root}: no such shard directory; build it with `python -m shards.demo` or `python -m shards.build`")
    if not path.is_file():
        raise UserError(f"{path}: missing; this folder was not written by shards.build/shards.demo (or the build did not finish)")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); rebuild the shards") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise UserError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    if doc.get("version") not in (1, VERSION):
        raise UserError(f"{path}: version {doc.get('version')!r}, this tokenlabel reads {VERSION}; rebuild the shards")
    return doc


def load_manifest(root: str | Path) -> Manifest:
    """Read and check DIR/manifest.json; every problem is one line naming the file and the fix."""
    root = Path(root)
    doc = read_document(root)
    path = root / MANIFEST
    if doc["version"] == 1:
        raise UserError(f"{path}: version 1 has no content digests; rebuild the shards, or run "
                        f"`python -m shards.manifest upgrade {root}`")
    check_schema(doc, path, VERSION)
    for name, split in doc["splits"].items():
        missing = [s["file"] for s in split["shards"] if not (root / s["file"]).is_file()]
        if missing:
            raise UserError(f"{root / missing[0]}: shard listed in the manifest is missing ({len(missing)} missing in split '{name}')")
    return Manifest(root, doc["classes"], doc["has_masks"], doc["splits"], doc.get("hflip", True))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return Digesting(file).hexdigest_to_end()


def upgraded_split(root: Path, name: str, split: dict[str, Any]) -> dict[str, Any]:
    """A version-1 split with each shard's sha256, its content digest and mask count, once its tars' keys and
    counts (from their headers) are those the manifest lists."""
    keys, masks, shards = [], 0, []
    for shard in split["shards"]:
        path = root / shard["file"]
        if not path.is_file():
            raise UserError(f"{path}: shard listed in the manifest is missing; rebuild the shards")
        members = shard_members(path)
        held = distinct_keys(members)
        if len(held) != shard["count"]:
            raise UserError(f"{path}: holds {len(held)} samples but manifest.json says {shard['count']}; "
                            "rebuild the shards")
        keys += held
        masks += sum(ext == "mask.png" for _, ext in members)
        shards.append({**shard, "sha256": file_sha256(path)})
    if keys_digest(keys) != split["digest"]:
        raise UserError(f"{root / MANIFEST}: split '{name}': the tars' keys are not those the manifest lists "
                        "(key digest differs); rebuild the shards")
    return {**split, "shards": shards, "content_digest": content_digest(shards), "masks": masks}


def upgrade(root: Path) -> None:
    """Rewrite a version-1 DIR/manifest.json as version 2 (atomically), after checking its tars."""
    doc = read_document(root)
    if doc["version"] == VERSION:
        load_manifest(root)  # checked all the same
        print(f"{root / MANIFEST}: already version {VERSION}")
        return
    check_schema(doc, root / MANIFEST, 1)
    splits = {name: upgraded_split(root, name, split) for name, split in doc["splits"].items()}
    write_manifest(root, doc["classes"], splits, doc.get("hflip", True))
    print(f"{root / MANIFEST}: upgraded to version {VERSION} ("
          + ", ".join(f"{name} {len(split['shards'])} shards" for name, split in splits.items()) + ")")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Maintain a shard set's manifest.json.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("upgrade", help="version 1 -> 2: add the tars' sha256 and content digests").add_argument(
        "root", type=Path, metavar="DIR", help="the shard folder")
    return parser


@cli
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    upgrade(args.root)


if __name__ == "__main__":
    main()
