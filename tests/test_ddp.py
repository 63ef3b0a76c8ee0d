"""DistributedDataParallel on the CPU: two Gloo processes on 127.0.0.1, a tiny model and data set.

No GPU is needed, so these run in every CI job. What they prove:

- the PK sampler gives the ranks disjoint identities in every step;
- DDP averages gradients: one step on two ranks gives the gradients and weights of one
  process stepping on the combined batch;
- only rank 0 prints or writes anything in the run folder (checked with Python audit
  hooks in every rank, and by capturing a ``torchrun`` run's whole output);
- a DDP run stopped at an epoch boundary and resumed ends with the weights of an
  uninterrupted DDP run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ddp_helpers import (BASE_CONFIG, GATHER_WEIGHTS, REPO, WORLD, build_step_criterion, free_port,
                         freeze_batchnorm, one_step, tiny_overrides, worker)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to float32 summation order: a tolerance relative to the tensor's magnitude."""
    return bool((a - b).abs().max() <= rel * b.abs().max() + 1e-7)


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("mode", ["images", "identities"])
def test_pk_sampler_ranks_get_disjoint_identities_every_step(mode):
    from attnreid.data.sampler import PKSampler

    pids = [i // 6 for i in range(72)]  # 12 ids x 6 images
    for epoch in range(3):
        ranks = [PKSampler(pids, 8, 2, seed=0, rank=r, world_size=WORLD, epoch_mode=mode) for r in range(WORLD)]
        for s in ranks:
            s.set_epoch(epoch)
        steps = list(zip(*[list(s) for s in ranks]))
        assert steps and all(len(b) == 8 for step in steps for b in step)
        for step in steps:
            ids = [{pids[i] for i in b} for b in step]
            assert len(ids[0]) == 4 and not ids[0] & ids[1], (epoch, ids)


# ---------------------------------------------------------------- find_unused_parameters

UNUSED_CASES = {
    "mhsanet": [],
    "mhsanet without RLM": ["model.mhsanet.rlm=false", "loss.rlm_ce=0", "loss.rlm_triplet=0"],
    "mhsanet, saffm_ce=0": ["loss.saffm_ce=0"],
    "mhsanet, global_ce=false (dagger)": ["loss.global_ce=false"],
    "mhsanet, rlm_ce=0": ["loss.rlm_ce=0"],
    "hacnn": ["model.name=hacnn", "model.hacnn.widths=[16,32,48]", "data.height=80", "data.width=32"],
}


@pytest.mark.parametrize("name", list(UNUSED_CASES))
def test_unused_classifiers_predicts_which_parameters_get_no_gradient(name, synthetic_root, one_thread):
    """What the trainer decides at build time (find_unused_parameters) against a real backward pass."""
    from attnreid.config import load_config
    from attnreid.distributed import unused_classifiers
    from attnreid.losses import build_criterion
    from attnreid.models import build_model

    cfg = load_config(BASE_CONFIG, tiny_overrides(synthetic_root, *TINY_MHSANET, *UNUSED_CASES[name]))
    torch.manual_seed(0)
    model = build_model(cfg.model, 4).train()
    criterion = build_criterion(cfg.loss, cfg.model)
    predicted = unused_classifiers(model, criterion.classifier_heads())
    total, _ = criterion(model(torch.randn(8, 3, cfg.data.height, cfg.data.width)),
                         torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    total.backward()
    no_grad = {n.split(".")[1] for n, p in model.named_parameters() if p.grad is None and n.startswith("classifiers.")}
    others = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("classifiers.")]
    assert predicted == sorted(no_grad)
    # Anything else without gradient sits behind a classifier that has none (the RLM's norm behind 'rlm').
    assert not others or predicted, others
    expected_unused = name.split(", ")[-1] in ("saffm_ce=0", "global_ce=false (dagger)", "rlm_ce=0")
    assert bool(predicted) == expected_unused


# ---------------------------------------------------------------- who speaks


def test_error_prefix_and_main_process_from_torchrun_environment(monkeypatch):
    from attnreid import distributed
    from attnreid.distributed import error_prefix, is_main_process
    from attnreid.errors import AttnReidError

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert error_prefix() == "error" and is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert error_prefix() == "error" and is_main_process()
    monkeypatch.setenv("RANK", "1")
    # Before training starts every rank runs the same code on the same files: rank 0 says it.
    monkeypatch.setattr(distributed, "_LOOP_STARTED", False)
    assert error_prefix() is None and not is_main_process()
    monkeypatch.setattr(distributed, "_LOOP_STARTED", True)
    assert error_prefix() == "error (rank 1)"
    collective = AttnReidError("loss is nan")
    collective.every_rank = True
    assert error_prefix(collective) is None
    monkeypatch.setenv("RANK", "0")
    assert error_prefix(collective) == "error"


# ---------------------------------------------------------------- two processes, one spawn

SGD = ["optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0", "optim.lr=0.5", "data.flip=false"]
TINY_MHSANET = ["model.name=mhsanet", "model.mhsanet.num_heads=2", "model.mhsanet.attention_dim=16",
                "model.mhsanet.embed_dim=32"]
# (overrides, whether one DDP step must equal one process on the combined batch, whether rank 1's
# first image is rank 0's: ddp_helpers.share_anchor_across_ranks)
STEP_CASES = [
    ([*SGD], True, False),  # baseline: cross-entropy only
    ([*SGD, *TINY_MHSANET, "loss.gather_triplets=true"], True, False),  # every MHSA-Net term, mined over both ranks
    # mined within each rank's share: rank 0's first anchor has its hardest negative on rank 1, by construction
    ([*SGD, *TINY_MHSANET, "loss.gather_triplets=false"], False, True),
    # BoT's center loss: the centres are outside DDP, broadcast from rank 0 and their gradients averaged
    ([*SGD, "model.bnneck=true", "loss.center_weight=0.5"], True, False),
]
# Two epochs of two steps; flips draw from each rank's RNG, so resuming must restore every rank's.
RUN_OVERRIDES = ["train.max_steps_per_epoch=2", "data.flip=true", "data.epoch_mode=images"]


@pytest.fixture(scope="module")
def spawned(synthetic_root, tmp_path_factory):
    """One 2-rank process group: one DDP step per STEP_CASES entry, then run B = 1 epoch and
    ``resume`` to 2 epochs, then run C, an MHSA-Net whose 'saffm' classifier has no loss, then
    run D in bf16 with a kernel fault injected on rank 1 at step 2 (see :func:`ddp_helpers.worker`)."""
    base = tmp_path_factory.mktemp("ddp_spawned")
    runs = [{"out_dir": str(base / "B"), "overrides": [*RUN_OVERRIDES, "train.epochs=1"]},
            {"out_dir": str(base / "B"), "overrides": [*RUN_OVERRIDES, "train.epochs=2"], "resume": True},
            {"out_dir": str(base / "C"),
             "overrides": [*RUN_OVERRIDES, *TINY_MHSANET, "loss.saffm_ce=0", "train.epochs=1"]},
            {"out_dir": str(base / "D"), "overrides": [*RUN_OVERRIDES, "train.amp=bf16", "train.epochs=1"],
             "fault": {"rank": 1, "at": 2}}]
    mp.spawn(worker, args=(free_port(), str(synthetic_root), str(base), [(c, s) for c, _, s in STEP_CASES], runs),
             nprocs=WORLD, join=True)
    return base


@pytest.fixture(scope="module")
def torchrun_run(synthetic_root, tmp_path_factory):
    """``torchrun --nproc_per_node=2 attnreid train configs/base.yaml ...`` (run A: 2 epochs),
    through tests/ddp_launch.py, which audits each rank's writes; returns (output, run dir, audit dir)."""
    base = tmp_path_factory.mktemp("ddp_torchrun")
    run_dir, audit = base / "A", base / "audit"
    audit.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", ATTNREID_AUDIT=str(audit), ATTNREID_AUDIT_WATCH=str(run_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / "tests" / "ddp_launch.py"),
           "train", str(BASE_CONFIG), *tiny_overrides(synthetic_root, *RUN_OVERRIDES, "train.epochs=2"),
           "--out", str(run_dir)]
    proc = subprocess.run(cmd, env=env, cwd=base, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output, run_dir, audit


def test_all_gather_with_grad_sums_the_ranks_gradients_into_each_slice(spawned):
    """Every rank computes L = sum(G * [x_0; x_1]); rank r's x_r must receive the sum over the
    ranks of dL/dx_r = 2 * G[rows of r], so that DDP's average gives the one-process gradient."""
    g = torch.tensor(GATHER_WEIGHTS)
    xs = [torch.arange(6, dtype=torch.float32).view(3, 2) + 10 * r for r in range(WORLD)]
    for r in range(WORLD):
        got = torch.load(spawned / f"gather{r}.pt", weights_only=True)
        assert torch.equal(got["gathered"], torch.cat(xs))
        assert torch.equal(got["grad"], WORLD * g[3 * r:3 * (r + 1)])
        assert "ranks hold batches of [3, 2] images" in got["unequal"] and "every_rank=True" in got["unequal"]
        # Before training starts every rank meets the same errors: rank 0 alone says them ...
        assert got["error_prefix"] == ("error" if r == 0 else None)
        # ... once it has trained, an error a rank meets can be its own: it says it, tagged.
        assert (spawned / f"error_prefix{r}.txt").read_text() == ("error" if r == 0 else f"error (rank {r})")


@pytest.mark.parametrize("case", range(len(STEP_CASES)))
def test_one_ddp_step_equals_one_process_on_the_combined_batch(spawned, synthetic_root, case, one_thread):
    """Two ranks of 4 images each vs one process on their 8 images, plain SGD.

    Why this comparison is exact in principle: BatchNorm runs on its running statistics
    (:func:`ddp_helpers.freeze_batchnorm`; with batch statistics each rank would normalise
    by its own share's mean and variance); SGD without momentum or weight decay turns a
    gradient into a weight change linearly (Adam's first step, ~lr * sign(g), would hide a
    wrong scale). Cross-entropy is a mean over images, so the ranks' mean gradient is the
    combined batch's. Batch-hard mining (triplet on p* and z, IHTL) is not per image: with
    ``loss.gather_triplets=true`` each rank mines over the gathered batch and the step is
    again the combined batch's; with ``false`` it is not, and the test must see that: that
    case's batch puts rank 0's first image on rank 1 too, with another label, so that its
    hardest negative lies on the other rank by construction. The
    center loss's centres live outside DDP: each rank draws other ones, so they must be
    broadcast from rank 0 and their gradients averaged for the centres to step as one
    process's on the combined batch.
    """
    from attnreid.config import load_config
    from attnreid.engine.optim import build_optimizer
    from attnreid.models import build_model

    overrides, equal, shared = STEP_CASES[case]
    ranks = [torch.load(spawned / f"step{case}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # The ranks drew disjoint identities from the sampler, as seen through the live process group.
    every = ranks[0]["every_pid"].tolist()
    assert every == ranks[1]["every_pid"].tolist() == ranks[0]["pids"].tolist() + ranks[1]["pids"].tolist()
    assert not set(every[:4]) & set(every[4:])

    assert torch.equal(ranks[0]["images"][0], ranks[1]["images"][0]) == shared
    cfg = load_config(BASE_CONFIG, tiny_overrides(synthetic_root, *overrides))
    num_classes = int(ranks[0]["num_classes"])

    def reference(images, pids):
        torch.manual_seed(0)
        model = build_model(cfg.model, num_classes)
        freeze_batchnorm(model, (cfg.data.height, cfg.data.width))
        criterion = build_step_criterion(cfg, model, num_classes, seed=100)  # rank 0's centres
        return one_step(model, criterion, build_optimizer(cfg.optim, [model, criterion]), images, pids,
                        cfg.loss.center_weight)

    combined = reference(torch.cat([r["images"] for r in ranks]), torch.cat([r["pids"] for r in ranks]))
    for rank, r in enumerate(ranks):
        assert set(r["grads"]) == set(combined["grads"])
        differ = [n for n, g in combined["grads"].items() if not _close(r["grads"][n], g)]
        differ += [n for n, w in combined["weights"].items() if not _close(r["weights"][n], w)]
        assert len(r["centers"]) == len(combined["centers"]) == ("loss.center_weight=0.5" in overrides)
        differ += [f"centers{i}" for i, c in enumerate(combined["centers"]) if not _close(r["centers"][i], c)]
        assert (not differ) == equal, (rank, differ[:5])
    rank_mean = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    if equal:
        assert abs(combined["loss"] - rank_mean) <= 1e-5 * abs(combined["loss"])
    else:
        # Mining over more images finds every anchor's hardest negative at least as near, and
        # rank 0's first anchor's at distance 0: the combined batch's loss is larger.
        assert combined["loss"] > rank_mean
    if case == 0:
        # The comparison can tell: one rank's share alone gives other gradients.
        alone = reference(ranks[0]["images"], ranks[0]["pids"])
        assert not all(_close(alone["grads"][n], g) for n, g in combined["grads"].items())


def test_a_bf16_fault_on_one_rank_reruns_the_step_on_every_rank(spawned):
    """Run D: rank 1's backbone returns inf at step 2 under bf16. Both ranks must re-run that
    step in float32 (a rank that applied it would leave the other waiting in DDP's all-reduce),
    and only rank 0 says so."""
    results = [json.loads((spawned / f"results{r}.json").read_text())[3] for r in range(WORLD)]
    assert [(r["status"], r["step"], r["amp_guard"]["faults"]) for r in results] == [("completed", 2, 1)] * WORLD
    log = [json.loads(l) for l in (spawned / "D" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "amp_fault"] == [2]
    assert (spawned / "printed0.txt").read_text().count("bf16 kernel fault at epoch 1 step 2") == 1
    from attnreid.engine.checkpoint import load_checkpoint

    weights = load_checkpoint(spawned / "D" / "checkpoints" / "last.pth")["model"]
    assert all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point())


def test_ddp_finds_unused_parameters_only_when_a_classifier_has_no_loss(spawned, torchrun_run):
    """Run C (loss.saffm_ce=0) needs find_unused_parameters: without it DDP stops at the second
    step ("Expected to have finished reduction in the prior iteration"). Run A (every head has
    its loss) must not ask for it: DDP would warn that it found nothing unused."""
    results = [json.loads((spawned / f"results{r}.json").read_text()) for r in range(WORLD)]
    assert [(r[2]["status"], r[2]["step"]) for r in results] == [("completed", 2)] * WORLD
    assert "find_unused_parameters" not in torchrun_run[0]


def _writes(audit: Path, rank: int) -> str:
    return (audit / f"writes{rank}.txt").read_text()


def test_only_rank0_prints_and_writes(spawned):
    assert _writes(spawned, 1) == ""
    for name in ("checkpoints/last.pth", "log.jsonl", "eval.json", "config.yaml"):
        assert f"B/{name}" in _writes(spawned, 0), name
    assert (spawned / "printed1.txt").read_text() == ""
    printed0 = (spawned / "printed0.txt").read_text()
    assert "epoch 2/2" in printed0 and "resumed" in printed0
    # Every step logged once: rank 1 did not append to log.jsonl.
    log = [json.loads(l) for l in (spawned / "B" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["type"] for r in log].count("resume") == 1


def test_ddp_resume_matches_an_uninterrupted_run(spawned, torchrun_run):
    from attnreid.engine.checkpoint import load_checkpoint

    results = [json.loads((spawned / f"results{r}.json").read_text()) for r in range(WORLD)]
    assert [r["epoch"] for r in results[0][:2]] == [1, 2] and results[0][1]["step"] == 4
    a = load_checkpoint(torchrun_run[1] / "checkpoints" / "last.pth")
    b = load_checkpoint(spawned / "B" / "checkpoints" / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 4)
    for name, w in a["model"].items():
        if w.is_floating_point():
            assert _close(b["model"][name], w), name
        else:
            assert torch.equal(b["model"][name], w), name


# ---------------------------------------------------------------- torchrun, the CLI


def test_torchrun_cli_prints_each_line_once(torchrun_run):
    output, run_dir, audit = torchrun_run
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) == len(set(lines)), output
    completed = [l for l in lines if l.startswith("completed:")]
    assert len(completed) == 1 and "mAP" in completed[0], output
    assert "find_unused_parameters" not in output and "[rank1]" not in output, output
    assert _writes(audit, 1) == ""
    for name in ("checkpoints/last.pth", "log.jsonl", "eval.json", "config.yaml"):
        assert f"A/{name}" in _writes(audit, 0), name
