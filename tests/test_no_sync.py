"""No host-device synchronisation in the student's training loop, checked on the CPU with the meta device.

A CUDA host waits for the device when it reads a value the device computed (`.item()`, `.tolist()`, `bool(t)`,
`.cpu()`, a device-to-host copy), when it sends host memory with a blocking copy (`.to(device)` of a host tensor,
`torch.tensor(data, device=...)`, `t.new_tensor(data)`), and when an op's output shape depends on the data
(`nonzero`, boolean indexing, `unique`, `masked_select`). The meta device stands in for the accelerator: its
tensors have shapes but no data, so the step runs (forward, loss, backward, AdamW, schedule, EMA) without doing
the arithmetic, and every crossing between the host (CPU) and meta is visible to torch's function and dispatch
modes. `HostSync` records each such crossing; a read returns a stand-in value so that core.engine's loop, which
reads the summed losses at its log points, runs on.

What this proves: none of the calls above happens in a step of the real trainer (train.student's Run, its
StudentObjective and core.optim's Optimization) for each mode listed, and core.engine.train_one_epoch reads only
at its --log-interval points and at the end. What it does not: that CUDA kernels never sync inside (those the
tags below name are checked), that the loader's batches are pinned (the DataLoader pins on CUDA, and the batch is
the one non-blocking copy a step makes), the allocator's first-step growth, fp16's GradScaler (it reads its
inf check every step by design; bf16 is the GPU default), or the compiled path (torch.compile of the same code).
"""

import pytest
import torch
from test_student_train import argv, labeler_checkpoint, make_run
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from core.engine import train_one_epoch

HOST = torch.device("cpu")
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
FROM_HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
DATA_DEPENDENT = {torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape}


def on_device(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device != HOST


class HostSync(TorchFunctionMode):
    """Records (step, what) for every host-device crossing that would make a CUDA host wait; see the module doc."""

    def __init__(self, steps: list[int]):
        super().__init__()
        self.steps, self.events = steps, []
        self.dispatch = _Dispatch(self)

    def record(self, what: str) -> None:
        self.events.append((len(self.steps), what))

    def __enter__(self):
        self.dispatch.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.dispatch.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS and on_device(args[0]):
            self.record(f"read {func.__name__}")
            stand_in = torch.zeros(args[0].shape)  # meta has no values: the host gets zeros
            return stand_in if func is torch.Tensor.cpu else stand_in.numpy() if func is torch.Tensor.numpy \
                else getattr(stand_in, func.__name__)()
        if func in FROM_HOST_DATA:
            device = kwargs.get("device", args[0].device if func is torch.Tensor.new_tensor else None)
            if device is not None and torch.device(device) != HOST:
                self.record(f"host data sent by {func.__name__}")
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    """The aten-level half of HostSync: copies between host and device, scalar reads, data-dependent shapes."""

    def __init__(self, owner: HostSync):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if DATA_DEPENDENT & set(func.tags) and any(t.device != HOST for t in tensors) and not integer_index(func, args):
            self.owner.record(f"data-dependent {func.overloadpacket.__name__}")
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            dst = kwargs.get("device") or src.device if func is torch.ops.aten._to_copy.default else args[0].device
            blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
            if src.device == HOST and dst != HOST and blocking:
                self.owner.record("blocking host-to-device copy")
            elif src.device != HOST and dst == HOST:
                self.owner.record("device-to-host copy")
        return func(*args, **kwargs)


def integer_index(func, args) -> bool:
    """Indexing by integer tensors: tagged as having a dynamic shape (for masks), but its shape is the index's."""
    indexing = func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put, torch.ops.aten.index_put_)
    return indexing and all(i is None or not (i.dtype == torch.bool or i.dtype == torch.uint8) for i in args[1])


VARIANTS = [
    ["--model", "fan_demo_tiny_p8", "--target", "gumbel", "--tau", "0.5", "--mix", "cutmix", "--clip-grad", "1.0"],
    ["--target", "softmax", "--mix", "mixup", "--map-weight", "0.5"],
    ["--target", "argmax", "--mix", "both"],
    ["--mix", "mixtoken"],
    ["--tl-align", "paper", "--mix", "mixtoken"],
    ["--model", "fan_demo_tiny_p8", "--tl-align", "dense", "--mix", "mixtoken"],
    ["--tl-align", "dense", "--target", "softmax", "--mix", "mixup"],
    ["--no-token-labels", "--mix", "cutmix"],
    ["--online-labeler"],
]


@pytest.mark.parametrize("flags", VARIANTS, ids=" ".join)
def test_the_training_loop_reads_the_device_only_at_its_log_points(dataset, tmp_path, flags):
    _, store = dataset
    root = store.parent.parent
    if flags == ["--online-labeler"]:
        flags = ["--labels", str(root), "--online-labeler", str(labeler_checkpoint(tmp_path / "labeler.pt"))]
    run = make_run(*argv(store, tmp_path / "run", "--model", "vit_tiny_patch16_224", "--patch-size", "16",
                         "--batch-size", "4", "--drop-path", "0.1", *flags))
    device = torch.device("meta")  # the accelerator's stand-in, after the run was built on the host
    torch.__future__.set_swap_module_params_on_conversion(True)  # the optimizer keeps its parameters
    try:
        for module in (run.student, run.optim.ema.module, run.labeler):
            if module is not None:
                module.to(device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    run.objective.device = device
    batches = list(run.loader())
    assert len(batches) == 4 and batches[0]["image"].device == HOST
    steps: list[int] = []

    def objective(batch, epoch, step):
        steps.append(step)
        return run.objective(batch, epoch, step)

    with HostSync(steps) as sync:
        metrics, step = train_one_epoch(objective, run.optim, batches, epoch=0, step=0, steps=4, log_interval=2,
                                        show=False)
    assert step == 4 and steps == [0, 1, 2, 3]
    assert sync.events == [(2, "read tolist"), (4, "read tolist"), (4, "read tolist")]  # log points, then the means
    state = run.optim.optimizer.state
    assert all(p in state and p.device == device for p in run.student.parameters() if p.grad is not None)
    assert len(state) > len(list(run.student.parameters())) // 2  # AdamW stepped the trained parameters


def test_the_probe_sees_what_syncs():
    """Each kind of crossing is recorded, and the allowed one (the batch's non-blocking copy) is not."""
    steps = [0]
    x = torch.zeros(4, device="meta")
    with HostSync(steps) as sync:
        torch.ones(3).to("meta", non_blocking=True)
        assert x.sum().item() == 0 and x.tolist() == [0.0] * 4 and not bool(x[:1])
        torch.arange(3).to("meta")
        x.new_tensor([1.0, 2.0])
        torch.tensor([1.0], device="meta")
        x[torch.zeros(2, dtype=torch.long, device="meta")]  # integer indexing: the index's shape
        for data_dependent in (lambda: x[x > 0], lambda: x.nonzero()):
            with pytest.raises(NotImplementedError):  # meta cannot know the shape either
                data_dependent()
    assert [what for _, what in sync.events] == [
        "read item", "read tolist", "read __bool__", "blocking host-to-device copy", "host data sent by new_tensor",
        "host data sent by tensor", "data-dependent index", "data-dependent nonzero"]
