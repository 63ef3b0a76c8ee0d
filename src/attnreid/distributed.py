"""Multi-process training under ``torchrun``: the process group, rank 0, gathers across ranks.

One process per device; ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :meth:`DistContext.from_env` joins the process group
(NCCL on CUDA, Gloo on CPUs) when ``WORLD_SIZE > 1`` and is a no-op otherwise, so a
single-process run never touches :mod:`torch.distributed`.

:func:`all_gather_with_grad` is what ``loss.gather_triplets`` uses to mine batch-hard
triplets over every rank's share of the step's batch (the authors mined within the whole
batch of 128). Its backward sums, over ranks, the gradient each rank's loss sends to a
slice and returns each rank its own slice's sum. With every rank computing the same loss
L on the gathered batch, rank r's features thus receive ``W * dL/df_r``, and DDP's
average over the W ranks leaves ``dL/dtheta``: the single-process gradient of L on the
combined batch (tested in ``tests/test_ddp.py``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

from attnreid.errors import ConfigError


@dataclass
class DistContext:
    """Rank and world size of this process; ``world_size == 1`` outside ``torchrun``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this context joined the group, so :meth:`close` leaves it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs, evaluates and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "DistContext":
        """Join the process group torchrun describes in the environment (once per process)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ConfigError(f"environment variable WORLD_SIZE is {os.environ['WORLD_SIZE']!r}; "
                              f"expected an integer") from None
        if world <= 1:
            return cls()
        import torch.distributed as dist

        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and not dist.is_initialized():
            raise ConfigError(f"WORLD_SIZE is {world} but {', '.join(missing)} is not set: start multi-process "
                              f"training with torchrun (docs/training.md)")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, owns_group=owns)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def gather_object(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj`` in rank order on rank 0, None elsewhere (a collective: call on all ranks)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        box: Optional[List[Any]] = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, box, dst=0)
        return box

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective: call on all ranks; others pass anything)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: Dict[str, float]) -> Dict[str, float]:
        """Each value averaged over the ranks (for logging the loss of the whole step's batch)."""
        if not self.enabled or not values:
            return dict(values)
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on one: decisions that end a loop (the
        time budget) must be taken together, or the ranks that go on wait for the others."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def close(self) -> None:
        """Leave the process group if this context joined it (torch warns at exit about one left open)."""
        if self.enabled and self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of the process group, or of torchrun's environment (``RANK``) once the group is left."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


_LOOP_STARTED = False  # set by the trainer in this process; see error_prefix


def mark_loop_started() -> None:
    """The training loop begins: from here on a rank's errors can be its own (its batches)."""
    global _LOOP_STARTED
    _LOOP_STARTED = True


def error_prefix(error: Optional[BaseException] = None) -> Optional[str]:
    """How the CLI introduces an error line in this process, or None to stay silent.

    ``error`` on rank 0 and outside torchrun. On another rank: silent until the training
    loop starts (until then every rank runs the same code on the same config and files,
    so rank 0 says it), and for an ``error`` marked ``every_rank`` (raised on all ranks at
    once, e.g. a NaN in the ranks' mean loss); ``error (rank N)`` otherwise, e.g. a bad
    image in that rank's share of a batch.
    """
    rank = os.environ.get("RANK", "0")
    if rank in ("", "0") or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return "error"
    if not _LOOP_STARTED or getattr(error, "every_rank", False):
        return None
    return f"error (rank {rank})"


def unused_classifiers(model: nn.Module, used_heads: Iterable[str]) -> List[str]:
    """The model's classifier heads that no loss term reads (their weights get no gradient).

    Every parameter of the three models lies upstream of some classifier in
    ``model.classifiers`` (backbone, attention, fusion and RLM all feed one), and a
    classifier only gets a gradient through its own cross-entropy. So parameters go
    without gradient exactly when a classifier's CE weight is 0 (e.g. ``loss.saffm_ce=0``,
    ``loss.global_ce=false``), which is known when the model and criterion are built;
    ``tests/test_ddp.py`` checks this against a real backward pass.
    """
    heads = getattr(model, "classifiers", None) or {}
    return sorted(set(heads) - set(used_heads))


def wrap_ddp(model: nn.Module, device: torch.device, find_unused: bool) -> nn.Module:
    """DistributedDataParallel around ``model``; ``find_unused`` only when a head goes without gradient
    (it costs a traversal of the autograd graph every step, and DDP warns when it finds nothing)."""
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused)


def world_size() -> int:
    """The number of processes in the default group; 1 when none is initialised."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Each parameter's ``.grad`` replaced by its mean over the ranks (a collective; with one
    process a no-op). For parameters outside the DDP-wrapped model, e.g. the center loss's
    centres, whose gradients DDP does not reduce."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Every rank's copy of ``params`` set to rank ``src``'s (a collective; one process: no-op).
    DDP does this for the wrapped model's weights; parameters outside it need it too."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=src)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward: sum-reduce, keep own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        tensor = tensor.contiguous()
        ctx.rank, ctx.n = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on each) concatenated along dim 0, in rank order.

    Differentiable: see the module docstring for how the gradient reaches each rank. With
    one process it returns ``tensor`` itself.
    """
    if world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_labels(labels: torch.Tensor) -> torch.Tensor:
    """Every rank's labels concatenated in rank order (no gradient: labels are integers).

    Gathers the ranks' batch sizes first: the feature gather needs equal shapes, and a
    batch that lost images (``data.skip_bad_images``) would otherwise fail inside Gloo or
    NCCL with a message naming neither.
    """
    if world_size() == 1:
        return labels
    import torch.distributed as dist

    labels = labels.contiguous()
    rows = torch.tensor([labels.shape[0]], dtype=torch.long, device=labels.device)
    every = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(every, rows)
    counts = [int(r) for r in every]
    if len(set(counts)) > 1:
        error = ConfigError(f"loss.gather_triplets: the ranks hold batches of {counts} images this step; the "
                            f"gather needs equal batches (with data.skip_bad_images, remove the bad images "
                            f"or set loss.gather_triplets=false)")
        error.every_rank = True  # every rank sees the same counts and stops here
        raise error
    parts: List[torch.Tensor] = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels)
    return torch.cat(parts, dim=0)


__all__ = ["DistContext", "all_gather_labels", "all_gather_with_grad", "error_prefix", "is_main_process",
           "mark_loop_started", "unused_classifiers", "world_size", "wrap_ddp"]
