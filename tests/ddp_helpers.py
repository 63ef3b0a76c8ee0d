"""Two-process Gloo harness for tests/test_ddp.py: free port, write audit, the spawned workers.

The workers live here, not in the test module, so that ``torch.multiprocessing.spawn``
children import a small module instead of re-collecting tests.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import socket
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

WORLD = 2
REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "base.yaml"  # what `attnreid train configs/base.yaml ...` starts from


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound with port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(root: Path, *extra: str) -> List[str]:
    """MobileNetV3-small at 32x16, PK batches of 2 ids x 2 images per rank, CPU, one thread."""
    return ["data.dataset=market1501", f"data.root={root}", "data.height=32", "data.width=16",
            "data.batch_size=4", "data.num_instances=2", "data.test_batch_size=64", "data.workers=0",
            "model.name=baseline", "model.backbone.name=mobilenetv3_small", "model.backbone.pretrained=false",
            "train.device=cpu", "train.threads=1", 'train.amp="off"', "train.eval_every=0", "train.log_every=1",
            "optim.warmup_epochs=0", "optim.milestones=[]", *extra]


# 6 x 2, the same on every rank.
GATHER_WEIGHTS = [[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0], [2.0, 2.0], [0.25, -0.5], [4.0, 1.0]]

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def install_write_audit(watched: Sequence[str], log_path: str) -> None:
    """Append to ``log_path`` every file or folder this process creates, writes, renames or
    deletes under one of the ``watched`` folders (Python's audit hooks see every ``open``,
    including torch.save's file handle, numpy's zip and json's writes)."""
    roots = [os.path.realpath(w) for w in watched]
    log = open(log_path, "a", buffering=1)

    def inside(p) -> bool:
        try:
            real = os.path.realpath(os.fsdecode(p))
        except (TypeError, ValueError):
            return False
        return any(real == r or real.startswith(r + os.sep) for r in roots)

    def hook(event: str, args) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writes and inside(path):
                log.write(f"open {path}\n")
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            paths = [os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
            if any(inside(p) for p in paths):
                log.write(f"{event} {' '.join(paths)}\n")

    sys.addaudithook(hook)


def _join_group(rank: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout: a rank that dies must not leave the other waiting for 30 minutes.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))


def freeze_batchnorm(model, size) -> None:
    """BatchNorm in eval mode (running statistics), the rest in training mode.

    With batch statistics every rank normalises its share with its own mean and variance,
    so no averaging of gradients could reproduce the combined batch; with running
    statistics each image's forward pass depends on that image alone and the equivalence
    is exact in principle. The statistics are first measured on a fixed noise batch of
    ``size`` (H, W), the same in every process: a random-init network with the default
    statistics (mean 0, variance 1) lets the activations fade (MobileNetV3's features were
    equal to 1e-8 for all images), and then every triplet distance is 0, the batch-hard
    mining has nothing to choose and the comparison would test nothing.
    """
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the one calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, *size, generator=torch.Generator().manual_seed(0)))
    for m in norms:
        m.eval()


def one_step(model, criterion, optimizer, images, pids, center_weight: float = 0.0) -> Dict[str, object]:
    """Forward, loss, backward, SGD step (and the center loss's own SGD step when the criterion
    has centres); the gradients and the weights (and centres) after the step."""
    from attnreid.engine.optim import center_optimizer, step_centers
    from attnreid.losses.center import center_parameters

    center_opt = center_optimizer(criterion, 0.5)
    outputs = model(images)
    total, _ = criterion(outputs, pids)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    inner = getattr(model, "module", model)
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None}
    optimizer.step()
    step_centers(criterion, center_opt, center_weight)
    return {"loss": float(total.detach()), "grads": grads,
            "weights": {n: p.detach().clone() for n, p in inner.named_parameters()},
            "centers": [c.detach().clone() for c in center_parameters(criterion)]}


def build_step_criterion(cfg, model, num_classes: int, seed: int):
    """The criterion of one step case; centres (center loss) drawn from ``seed``, so that each
    rank starts from other centres until :func:`broadcast_parameters` makes them rank 0's."""
    import torch

    from attnreid.losses import build_criterion

    torch.manual_seed(seed)
    sizes = {"num_classes": num_classes, "global_dim": model.global_dim} if cfg.loss.center_weight else {}
    return build_criterion(cfg.loss, cfg.model, **sizes)


def share_anchor_across_ranks(images, rank: int) -> None:
    """Make rank 1's first image rank 0's first image (each keeps its own label): that image is
    then, at distance 0, the hardest negative of rank 0's first anchor, but only where the
    triplets are mined over both ranks' images together."""
    import torch.distributed as dist

    first = images[:1].clone()
    dist.broadcast(first, src=0)
    if rank == 1:
        images[0] = first[0]


@contextlib.contextmanager
def injected_fault(rank: int, fault: Optional[dict]):
    """On ``fault["rank"]``, the model's backbone returns inf on its ``fault["at"]``-th training
    forward under autocast (tests/helpers.py FaultOnCall); elsewhere nothing changes."""
    if not fault or fault["rank"] != rank:
        yield
        return
    import attnreid.models as models
    from helpers import FaultOnCall

    real = models.build_model

    def build(cfg, num_classes):
        model = real(cfg, num_classes)
        model.backbone.register_forward_hook(FaultOnCall(at=fault["at"]))
        return model

    models.build_model = build
    try:
        yield
    finally:
        models.build_model = real


def worker(rank: int, port: int, root: str, out: str, step_cases: List[Tuple[List[str], bool]],
           runs: List[dict]) -> None:
    """Everything the 2-rank tests need from one process group (one spawn: starting processes
    is the slow part).

    0. :func:`all_gather_with_grad` on a small tensor, :func:`all_gather_labels` on unequal
       shares and :func:`error_prefix` before any training (``out/gatherN.pt``).
    1. Per entry of ``step_cases`` (overrides, and whether to :func:`share_anchor_across_ranks`),
       one DDP step on this rank's first PK batch; saves the batch, every rank's labels, the
       gradients and the weights to ``out/stepI_rankN.pt``.
    2. :func:`attnreid.engine.trainer.train` once per entry of ``runs`` (``out_dir``,
       ``overrides``, ``resume``, ``fault``: see :func:`injected_fault`), recording what this
       rank printed (``printedN.txt``), what it wrote under the run folders (``writesN.txt``),
       the returned dicts (``resultsN.json``) and :func:`error_prefix` once training ran
       (``error_prefixN.txt``).
    """
    import torch
    from torch import nn

    from attnreid.config import load_config
    from attnreid.data.datasets import build_dataset
    from attnreid.data.loader import build_train_loader
    from attnreid.distributed import all_gather_labels, all_gather_with_grad, broadcast_parameters, error_prefix
    from attnreid.engine.optim import build_optimizer
    from attnreid.engine.trainer import train
    from attnreid.errors import ConfigError
    from attnreid.losses.center import center_parameters
    from attnreid.models import build_model

    _join_group(rank, port)
    # 0. The gather on its own: every rank computes L = sum(G * gathered) for one fixed G.
    x = torch.arange(6, dtype=torch.float32).view(3, 2).add(10 * rank).requires_grad_()
    gathered = all_gather_with_grad(x)
    (gathered * torch.tensor(GATHER_WEIGHTS)).sum().backward()
    try:
        all_gather_labels(torch.arange(3 - rank))  # unequal shares: every rank must refuse, in one line
        unequal = "no error"
    except ConfigError as exc:
        unequal = f"{str(exc)} every_rank={getattr(exc, 'every_rank', False)}"
    torch.save({"gathered": gathered.detach(), "grad": x.grad, "error_prefix": error_prefix(), "unequal": unequal},
               os.path.join(out, f"gather{rank}.pt"))

    for case, (overrides, share_anchor) in enumerate(step_cases):
        cfg = load_config(BASE_CONFIG, tiny_overrides(Path(root), *overrides))
        dataset = build_dataset(cfg.data.dataset, cfg.data.root)
        loader = build_train_loader(cfg.data, dataset, seed=cfg.train.seed, rank=rank, world_size=WORLD)
        images, pids = next(iter(loader))[:2]
        pids = torch.as_tensor(pids)
        if share_anchor:
            share_anchor_across_ranks(images, rank)
        every_pid = all_gather_labels(pids)
        torch.manual_seed(0)
        model = build_model(cfg.model, dataset.num_train_pids)
        freeze_batchnorm(model, (cfg.data.height, cfg.data.width))
        criterion = build_step_criterion(cfg, model, dataset.num_train_pids, seed=100 + rank)
        broadcast_parameters(center_parameters(criterion))  # as train() does
        net = nn.parallel.DistributedDataParallel(model)
        optimizer = build_optimizer(cfg.optim, [model, criterion])
        result = one_step(net, criterion, optimizer, images, pids, cfg.loss.center_weight)
        torch.save({"images": images, "pids": pids, "every_pid": every_pid, "num_classes": dataset.num_train_pids,
                    **result},
                   os.path.join(out, f"step{case}_rank{rank}.pt"))

    install_write_audit([r["out_dir"] for r in runs], os.path.join(out, f"writes{rank}.txt"))
    results = []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        for r in runs:
            cfg = load_config(BASE_CONFIG, tiny_overrides(Path(root), *r["overrides"]))
            with injected_fault(rank, r.get("fault")):
                results.append(train(cfg, r["out_dir"], resume=r.get("resume", False)))
    Path(out, f"printed{rank}.txt").write_text(printed.getvalue())
    Path(out, f"error_prefix{rank}.txt").write_text(str(error_prefix()))
    Path(out, f"results{rank}.json").write_text(json.dumps(results, default=str))
    torch.distributed.destroy_process_group()
