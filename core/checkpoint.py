"""Checkpoints of both trainers: one file holding the model's identity, its live and EMA weights, and the training state.

A checkpoint holds tensors and plain containers (dict, list, tuple, str, numbers, bool, None) only, so loading one
never runs code: it is read with torch.load(weights_only=True), and a file that needs more (a crafted pickle, or
a checkpoint of an older tokenlabel holding other objects) is refused. One you trust is converted with

    python -m core.checkpoint convert OLD NEW --trust-code
"""

import argparse
import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import UserError, cli
from common.files import atomic_output

FORMAT = "tokenlabel-checkpoint"
CONVERT = "python -m core.checkpoint convert"


def save_checkpoint(path: str | Path, *, model_name: str, num_classes: int, img_size: int,
                    model: nn.Module, ema: nn.Module, train_state: dict[str, Any] | None = None,
                    model_kwargs: dict[str, Any] | None = None, kind: str = "labeler",
                    dense_head_trained: bool = True, classes: list[str] | None = None) -> None:
    """Write atomically and durably (common.files.atomic_output) so a killed run never leaves a truncated checkpoint.

    `kind` is "labeler" or "student"; `model_kwargs` are the extra arguments that rebuild the model by name;
    `dense_head_trained` is False for a student trained without token labels (its per-token head got no loss);
    `classes` are the training set's class names (train.checkpoint_eval refuses shards with other classes).
    """
    payload = {
        "format": FORMAT,
        "kind": kind,
        "model": model_name,
        "model_kwargs": model_kwargs or {},
        "num_classes": num_classes,
        "classes": classes,
        "img_size": img_size,
        "dense_head_trained": dense_head_trained,
        "state_dict": model.state_dict(),
        "ema": ema.state_dict(),
        "train_state": train_state or {},
    }
    write_payload(payload, path)


def write_payload(payload: dict[str, Any], path: str | Path) -> None:
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint dict without running code, refusing a file that is missing or not ours with one line.

    The dict gets "sha256": the hex sha256 of the very bytes loaded (identifies the exact labeler a dump came
    from). With `sha256`, a file whose bytes have another digest is refused (replaced since that digest was taken).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; pass a last.pt written by labeler.train or train.student")
    with open(path, "rb") as f:  # hash and load one open file: a file renamed over `path` meanwhile is not mixed in
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sha256 is not None and digest != sha256:
            raise UserError(f"{path}: replaced since this job read it (sha256 {sha256[:12]}..., now {digest[:12]}...); "
                            f"a job reads one checkpoint throughout: run it again once the file stays as it is")
        f.seek(0)
        try:
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged file
            refuse_unsafe(path, e)
            raise UserError(f"{path}: not a readable torch checkpoint ({type(e).__name__}); re-run training") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not a tokenlabel checkpoint (no '{FORMAT}' format tag)")
    return {**ckpt, "sha256": digest}


def code_needed(error: Exception) -> str | None:
    """What a torch.load(weights_only=True) failure says a file would run ("imports posix.system", torch naming the
    first global it would import), or None when the file failed for another reason (damaged, not torch's)."""
    if isinstance(error, pickle.UnpicklingError) and str(error).startswith("Weights only load failed"):
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        return f"imports {found.group(1)}" if found else "holds objects other than tensors and plain containers"
    return None


def refuse_unsafe(path: Path, error: Exception) -> None:
    """One line for a checkpoint that loads only by running code, with the way out for one you trust."""
    what = code_needed(error)
    if what:
        raise UserError(f"{path}: loading it would run code (it {what}), so it is refused; an older tokenlabel "
                        f"checkpoint you trust: `{CONVERT} {path} NEW.pt --trust-code`") from None


def plain(value: Any, where: str = "checkpoint") -> Any:
    """`value` in the types a weights-only load accepts: numpy scalars and arrays become numbers and tensors,
    paths strings; anything else that is not a tensor or plain container is refused, naming where it is."""
    if isinstance(value, dict):
        return {k: plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (torch.Tensor, str, int, float, bool)):
        return value
    raise UserError(f"{where}: a {type(value).__module__}.{type(value).__name__}, which a checkpoint cannot hold; "
                    f"not converted")


def convert(old: Path, new: Path) -> None:
    """Rewrite a trusted checkpoint that needs code to load (weights_only=False) in plain types."""
    if not old.is_file():
        raise UserError(f"{old}: no such file")
    try:
        ckpt = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{old}: not a readable torch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{old}: not a tokenlabel checkpoint (no '{FORMAT}' format tag); not converted")
    write_payload(plain(ckpt), new)
    read_checkpoint(new)  # what was written loads without running code


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("convert", help="rewrite a trusted older checkpoint so that it loads without running code")
    p.add_argument("old", type=Path, help="the checkpoint to convert")
    p.add_argument("new", type=Path, help="where to write the converted checkpoint")
    p.add_argument("--trust-code", action="store_true",
                   help="required: reading OLD runs whatever code its pickle holds (torch.load weights_only=False); "
                        "pass it only for a file you made or trust")
    args = parser.parse_args(argv)
    if not args.trust_code:
        raise UserError(f"{args.old}: converting runs the code the file holds; pass --trust-code if you trust it")
    convert(args.old, args.new)
    print(f"wrote {args.new}: loads without running code")


if __name__ == "__main__":
    main()
