"""The bottom layer: one-line errors (also from DataLoader workers), durable atomic files, overlap refusals."""

import subprocess
import sys
import textwrap

import pytest
from torch.utils.data import DataLoader, IterableDataset

from common.errors import UserError, one_line
from common.files import atomic_write, read_marker, refuse_overlap, replace_folder, write_marker


class Refusing(IterableDataset):
    def __iter__(self):
        raise UserError("shard-000001.tar: key a/b: not a decodable image; rebuild the shard")


def test_a_user_error_in_a_dataloader_worker_is_its_one_line():
    with pytest.raises(UserError) as caught:
        next(iter(DataLoader(Refusing(), batch_size=None, num_workers=1)))
    assert "Traceback" in str(caught.value)  # what torch makes of it
    assert one_line(caught.value) == "shard-000001.tar: key a/b: not a decodable image; rebuild the shard"


def test_cli_prints_the_worker_error_as_one_line():
    script = textwrap.dedent("""
        from torch.utils.data import DataLoader, IterableDataset
        from common.errors import UserError, cli

        class Refusing(IterableDataset):
            def __iter__(self):
                raise UserError("shard-000001.tar: key a/b: not a decodable image; rebuild the shard")

        @cli
        def main():
            next(iter(DataLoader(Refusing(), batch_size=None, num_workers=1)))

        main()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: shard-000001.tar: key a/b: not a decodable image; rebuild the shard\n"


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_replace_folder_swaps_whole_folders(tmp_path):
    old, new = tmp_path / "out", tmp_path / "out.partial"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    replace_folder(new, old)
    assert [p.name for p in old.iterdir()] == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_markers_and_overlaps(tmp_path):
    assert read_marker(tmp_path) is None
    (tmp_path / ".tokenlabel.json").write_text('{"tool": "other"}')
    assert read_marker(tmp_path) is None  # not ours
    write_marker(tmp_path, "run", model="m")
    assert read_marker(tmp_path)["kind"] == "run"
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    for out in (data, data / "imgs", tmp_path):
        with pytest.raises(UserError, match="--out .*is, holds or sits inside --imagefolder"):
            refuse_overlap(out, {"--imagefolder": data / "imgs"})
    refuse_overlap(data / "imgs" / "sub", {"--imagefolder": data / "imgs"})  # inside: only refused when asked
    with pytest.raises(UserError):
        refuse_overlap(data / "imgs" / "sub", {"--imagefolder": data / "imgs"}, inside=True)
    refuse_overlap(data / "shards", {"--imagefolder": data / "imgs"}, inside=True)  # beside it: fine
