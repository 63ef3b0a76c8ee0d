"""bf16 kernel faults caught during training (issue 25): a check of the model's layers, and a guard per step.

On Intel CPUs with AMX, torch 2.13's oneDNN bf16 convolution returns garbage for some
shapes (ResNet-18's ``layer4.0.conv1`` on a 4x2 input: its second output row, every
call; sometimes inf/NaN). A non-finite loss then kills the run, and a finite but wrong
output trains a wrong model without anyone noticing (docs/training.md, "bf16 kernel
faults"). Two mechanisms, both only while the run trains in bf16:

1. **Layer check** (``before_train``): every convolution and linear layer of the model is
   run on its own input shape (one forward of a batch-sized input records them) in bf16,
   forward and backward, ``CHECK_CALLS`` times, the first call compared with float32
   (:func:`attnreid.precision.check_bf16_kernel`; once per distinct shape). A layer that
   fails runs in float32 from then on (autocast off inside it); the others keep bf16.
2. **Step guard** (:meth:`AmpGuard.run_step`): a step whose loss, gradients or BatchNorm
   statistics are not finite under bf16 is not applied. The BatchNorm buffers and the
   RNG are put back and the same batch is re-run in float32. Each such fault is counted;
   after ``train.amp_fallback_after`` of them the run trains in float32 for good. A step
   whose float32 re-run is not finite either is no kernel fault: it goes on to
   :class:`~attnreid.engine.hooks.NonFiniteLossGuard`, which stops the run as before.

Under DDP every rank takes the same decisions: the ranks' non-finite flags are reduced
(one rank's fault re-runs the step on all), and a layer that fails on one rank runs in
float32 on all. The faults, the fall-back and the float32 layers are kept in
``last.pth`` (``amp_guard``), so a resumed run goes on as the interrupted one would.
Each event is one line on stderr and a ``log.jsonl`` record (``amp_check``, ``amp_fault``).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from attnreid.engine.hooks import Hook
from attnreid.precision import KernelCheck, Precision, check_bf16_kernel

CHECKED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Calls per distinct layer and shape (the first also in float32): the faults measured so far
# show on every call.
CHECK_CALLS = 2
DOCS = "docs/training.md#bf16-kernel-faults"


class Float32Forward:
    """A module's own forward with autocast off and float32 inputs (set as ``module.forward``)."""

    def __init__(self, forward: Callable, device_type: str):
        self.forward, self.device_type = forward, device_type

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        with torch.autocast(self.device_type, enabled=False):
            return self.forward(*args, **kwargs)


def pin_float32(module: nn.Module, device_type: str) -> None:
    """Run ``module`` in float32 under any autocast from now on (idempotent)."""
    if not isinstance(module.__dict__.get("forward"), Float32Forward):
        module.forward = Float32Forward(module.forward, device_type)


def layer_inputs(model: nn.Module, input_shape: Sequence[int], channels_last: bool,
                 device: torch.device) -> Dict[str, List[Tuple[tuple, bool]]]:
    """Every checked layer's input shapes and layouts on one training-mode forward of ``input_shape``.

    The forward runs without gradient on a random input; the model's buffers (BatchNorm
    statistics) and the global RNG are left as they were."""
    seen: Dict[str, List[Tuple[tuple, bool]]] = {}

    def record(name: str):
        def hook(module, args):
            x = args[0]
            key = (tuple(x.shape), x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                   and not x.is_contiguous())
            if key not in seen.setdefault(name, []):
                seen[name].append(key)
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
               if isinstance(m, CHECKED_LAYERS)]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
    return seen


def check_layers(model: nn.Module, input_shape: Sequence[int], channels_last: bool, device: torch.device,
                 calls: int = CHECK_CALLS) -> Tuple[List[KernelCheck], List[str], int]:
    """The bf16 self-check of ``model``'s own layers: the checks (one per distinct layer and
    input shape), the names of the layers that failed one, and how many layers ran."""
    modules = dict(model.named_modules())
    signatures: Dict[tuple, List[str]] = {}
    inputs = layer_inputs(model, input_shape, channels_last, device)
    for name, shapes in inputs.items():
        m = modules[name]
        for shape, cl in shapes:
            signatures.setdefault((type(m).__name__, m.extra_repr(), shape, cl), []).append(name)
    gen = torch.Generator().manual_seed(0)
    checks, failed = [], []
    for (kind, _, shape, cl), names in signatures.items():
        c = check_bf16_kernel(modules[names[0]], shape, calls=calls, channels_last=cl, name=names[0], generator=gen,
                              device=device)
        checks.append(c)
        if not c.ok:
            failed += [n for n in names if n not in failed]
    return checks, failed, len(inputs)


class AmpGuard(Hook):
    """The layer check (``before_train``) and the per-step guard (:meth:`run_step`) of a bf16 run.

    Inactive (no check, no cost) unless ``precision`` is bf16 autocast. Standalone use
    (benchmarks): :meth:`attach` then :meth:`run_step`; as a trainer hook it attaches
    itself and logs through the trainer. The layer check runs on ``input_shape`` (a training
    batch: B x 3 x H x W, laid out channels-last with ``channels_last``); without one, or with
    ``check=False``, only the step guard runs.
    """

    def __init__(self, precision: Precision, fallback_after: int = 3, check: bool = True,
                 input_shape: Optional[Sequence[int]] = None, channels_last: bool = False):
        self.precision = precision
        self.fallback_after = fallback_after
        self.check = check
        self.input_shape, self.channels_last = input_shape, channels_last
        self.faults = 0  # steps re-run in float32
        self.float32 = False  # fallen back for good
        self.pinned: List[str] = []  # layers that run in float32
        self.model: Optional[nn.Module] = None
        self.params: List[torch.Tensor] = []
        self.buffers: List[torch.Tensor] = []
        self.saved: List[torch.Tensor] = []
        self.dist: Any = None
        self.bad = ""

    @property
    def active(self) -> bool:
        return self.precision.dtype is torch.bfloat16 and not self.float32

    # ---- state kept in last.pth
    def state_dict(self) -> Dict[str, Any]:
        return {"faults": self.faults, "float32": self.float32, "pinned": list(self.pinned)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.faults = int(state.get("faults", 0))
        self.float32 = bool(state.get("float32", False))
        self.pinned = list(state.get("pinned", []))

    # ---- set-up
    def attach(self, model: nn.Module, modules: Sequence[nn.Module] = (), dist: Any = None) -> None:
        """Guard ``model`` (and the parameters of ``modules``, e.g. the criterion's centres)."""
        self.model, self.dist = model, dist
        self.params = [p for m in (model, *modules) for p in m.parameters() if p.requires_grad]
        self.buffers = list(model.buffers())
        self.saved = [b.clone() for b in self.buffers]
        self._pin(self.pinned)

    def _pin(self, names: Sequence[str]) -> None:
        modules = dict(self.model.named_modules())
        for n in names:
            if n in modules:
                pin_float32(modules[n], self.precision.device_type)
            if n not in self.pinned:
                self.pinned.append(n)

    def check_layers(self, input_shape: Sequence[int], channels_last: bool, device: torch.device) -> Dict[str, Any]:
        """Run the layer check and pin the failing layers (on every rank, the union over ranks)."""
        t0 = time.perf_counter()
        checks, failed, layers = check_layers(self.model, input_shape, channels_last, device)
        if self.dist is not None and self.dist.enabled:
            every: List[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(every, failed)
            failed = [n for names in every for n in names]
        new = [n for n in dict.fromkeys(failed) if n not in self.pinned]
        self._pin(new)
        return {"type": "amp_check", "layers": layers, "shapes": len(checks), "calls": CHECK_CALLS,
                "float32_layers": list(self.pinned), "new": new, "faults": [c.to_dict() for c in checks if not c.ok],
                "seconds": round(time.perf_counter() - t0, 2)}

    # ---- the trainer's hook
    def before_train(self, state: Any) -> None:
        t = self.trainer
        self.attach(t.model, [t.criterion], t.dist)
        if not (self.active and self.check and self.input_shape is not None):
            return
        record = self.check_layers(self.input_shape, self.channels_last, t.device)
        t.logger.write({**record, "epoch": state.epochs_done, "step": state.step})
        new = record["new"]
        if new and t.dist.is_main:
            more = f" and {len(new) - 1} more" if len(new) > 1 else ""
            print(f"bf16 kernel check: {new[0]}{more} gave wrong results in bf16 on this CPU; "
                  f"{'they run' if more else 'it runs'} in float32, the other {record['layers'] - len(self.pinned)} "
                  f"checked layers in bf16 (log.jsonl 'amp_check'; {DOCS})", file=sys.stderr, flush=True)

    # ---- the step
    def run_step(self, step: Callable[[Callable, Optional[Callable]], Any]) -> Any:
        """One optimiser step, guarded. ``step(autocast, check)`` runs the step under
        ``autocast()`` and, when ``check`` is given, calls ``check(loss)`` after the backward
        pass and returns None without applying the step when it says False."""
        if not self.active:
            return step(nullcontext if self.precision.dtype is torch.bfloat16 else self.precision.autocast, None)
        for s, b in zip(self.saved, self.buffers):
            s.copy_(b)
        rng = torch.get_rng_state()
        device = self.params[0].device if self.params else torch.device("cpu")
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        out = step(self.precision.autocast, self.finite)
        if out is not None:
            return out
        for b, s in zip(self.buffers, self.saved):
            b.copy_(s)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        out = step(nullcontext, None)
        if bool(torch.isfinite(out[0])):  # else no kernel fault: NonFiniteLossGuard stops the run
            self._fault()
        return out

    def finite(self, loss: torch.Tensor) -> bool:
        """The loss, the gradients and the buffers are finite, on every rank."""
        self.bad = ""
        if not bool(torch.isfinite(loss)):
            self.bad = "loss"
        elif not bool(torch.isfinite(_total_norm([p.grad for p in self.params]))):
            self.bad = "gradients"
        elif not bool(torch.isfinite(_total_norm([b for b in self.buffers if b.is_floating_point()]))):
            self.bad = "BatchNorm statistics"
        if self.dist is not None and self.dist.any(bool(self.bad)):
            self.bad = self.bad or "another rank's values"
        return not self.bad

    def _fault(self) -> None:
        self.faults += 1
        self.float32 = bool(self.fallback_after) and self.faults >= self.fallback_after
        t = self.trainer
        if t is None:
            return
        step = t.state.step + 1  # the step being taken (the trainer counts it when it returns)
        then = ("training goes on in float32 for good (train.amp_fallback_after="
                f"{self.fallback_after})" if self.float32 else "training goes on in bf16")
        t.logger.write({"type": "amp_fault", "epoch": t.state.epoch + 1, "step": step, "non_finite": self.bad,
                        "faults": self.faults, "float32": self.float32})
        if t.dist.is_main:
            print(f"bf16 kernel fault at epoch {t.state.epoch + 1} step {step}: non-finite {self.bad} in bf16; the "
                  f"step was re-run in float32 (fault {self.faults}); {then} ({DOCS})", file=sys.stderr, flush=True)


def _total_norm(tensors: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """The 2-norm over ``tensors``: inf or NaN when one holds such a value.

    The 2-norm, not the largest |value|: torch computes it with fused per-tensor kernels and no
    copy of the gradients, about ten times faster (docs/training.md, "What it costs"). It also
    overflows for finite values above about 1e19; such a step is diverging anyway and is re-run
    in float32 like a fault.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(present, norm_type=2.0)
