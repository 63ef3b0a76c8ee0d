"""Training modes: automatic precision, epochs of identities or images, a validation split held out of
the training identities (model selection never on the test split), subsets, MHSA-Net diagnostics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnreid.data.sampler import PKSampler
from test_engine import tiny_cfg


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- epochs: identities or images


def test_identity_epochs_visit_each_identity_once_in_p_by_k_batches():
    rng = np.random.default_rng(0)
    pids = [pid for pid in range(751) for _ in range(int(rng.integers(2, 12)))]  # Market's 751 ids
    s = PKSampler(pids, batch_size=128, num_instances=4, seed=0, epoch_mode="identities")
    batches = list(s)
    assert len(s) == len(batches) == 751 // 32 == 23
    seen = []
    for b in batches:
        ids = [pids[i] for i in b]
        assert len(b) == 128 and all(ids.count(p) == 4 for p in set(ids)) and len(set(ids)) == 32
        seen += sorted(set(ids))
    assert len(seen) == len(set(seen)) == 23 * 32  # no identity twice in an epoch
    s.set_epoch(1)
    assert list(s) != batches  # reshuffled per epoch
    s.set_epoch(0)
    assert list(s) == batches  # deterministic for (seed, epoch)


def test_image_epochs_visit_each_image_at_most_once_and_take_more_batches():
    pids = [pid for pid in range(8) for _ in range(8)]  # 8 ids x 8 images, K = 2 -> 4 groups each
    images = PKSampler(pids, batch_size=8, num_instances=2, seed=0, epoch_mode="images")
    ids = PKSampler(pids, batch_size=8, num_instances=2, seed=0, epoch_mode="identities")
    flat = [i for b in images for i in b]
    assert len(flat) == len(set(flat)) and len(ids) == 2
    assert 6 <= len(images) <= 8  # 32 groups / P = 4, less the tail where fewer than P ids are left


def test_identity_epochs_split_identities_across_ranks():
    pids = [pid for pid in range(40) for _ in range(5)]
    ranks = [PKSampler(pids, 8, 2, seed=3, rank=r, world_size=2, epoch_mode="identities") for r in (0, 1)]
    a, b = ({pids[i] for batch in s for i in batch} for s in ranks)
    assert len(ranks[0]) == len(ranks[1]) == 5 and not (a & b)


def test_train_with_identity_epochs_counts_steps_per_identity_pass(synthetic_root, tmp_path):
    from attnreid.engine.trainer import train

    # 5 training identities, P = 2: 2 batches an epoch
    cfg = tiny_cfg(synthetic_root, "data.epoch_mode=identities", "data.batch_size=4", "train.max_steps_per_epoch=0")
    result = train(cfg, tmp_path / "r", quiet=True)
    assert result["step"] == 4 and result["epoch"] == 2
    run = [r for r in _log(tmp_path / "r") if r["type"] == "run"][0]
    assert run["steps_per_epoch"] == 2 and run["epoch_mode"] == "identities" and run["train_ids"] == 5


def test_shipped_configs_count_epochs_as_their_papers_do():
    from pathlib import Path

    from attnreid.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(configs / "mhsanet" / "market1501.yaml").data.epoch_mode == "identities"
    assert load_config(configs / "mhsanet" / "occluded_duke_star.yaml").data.epoch_mode == "identities"
    assert load_config(configs / "hacnn" / "market1501.yaml").data.epoch_mode == "images"


# ---------------------------------------------------------------- validation split, subsets


def test_hold_out_validation_is_deterministic_and_disjoint(synthetic_root):
    from attnreid.data.datasets import build_dataset
    from attnreid.data.splits import hold_out_validation, limit_identities

    ds = build_dataset("market1501", str(synthetic_root))
    train_a, val_a = hold_out_validation(ds, 2)
    train_b, val_b = hold_out_validation(ds, 2)
    assert val_a.query == val_b.query and val_a.gallery == val_b.gallery and train_a.train == train_b.train
    held = {p for p, _, _ in val_a.query + val_a.gallery}
    assert held.isdisjoint(p for p, _, _ in train_a.train)
    assert len(held) + len(train_a.train) == len(ds.train)  # every image is in exactly one split
    assert train_a.num_train_pids == ds.num_train_pids - 2
    assert sorted({pid for _, pid, _ in train_a.train}) == list(range(ds.num_train_pids - 2))  # relabelled
    assert len({pid for _, pid, _ in val_a.query}) == 2 and 0 not in {pid for _, pid, _ in val_a.query}
    for pid in {pid for _, pid, _ in val_a.query}:  # one query per camera, the rest in the gallery
        q_cams = [c for _, p, c in val_a.query if p == pid]
        g_cams = {c for _, p, c in val_a.gallery if p == pid}
        assert len(q_cams) == len(set(q_cams)) and set(q_cams) == g_cams | set(q_cams)
    assert train_a.query == ds.query and train_a.gallery == ds.gallery  # the test split is untouched
    assert hold_out_validation(ds, 0) == (ds, None)
    sub = limit_identities(train_a, 2)
    assert sub.num_train_pids == 2 and len(sub.train) == sum(1 for it in train_a.train if it[1] < 2)


def test_too_many_validation_ids_is_one_line(synthetic_root):
    from attnreid.data.datasets import build_dataset
    from attnreid.data.splits import hold_out_validation
    from attnreid.errors import DataError

    with pytest.raises(DataError, match="data.val_ids is 4"):
        hold_out_validation(build_dataset("market1501", str(synthetic_root)), 4)


def test_best_is_chosen_on_validation_and_reported_numbers_come_from_the_last_weights(synthetic_root, tmp_path):
    from attnreid.config import load_config
    from attnreid.engine.build import load_model
    from attnreid.engine.checkpoint import load_checkpoint
    from attnreid.engine.evaluator import evaluate_model
    from attnreid.engine.trainer import train
    from attnreid.data.datasets import build_dataset
    from attnreid.data.splits import hold_out_validation

    run = tmp_path / "r"
    cfg = tiny_cfg(synthetic_root, "data.val_ids=2", "data.batch_size=4", "train.eval_every=1",
                   "train.epochs=3")
    result = train(cfg, run, quiet=True)
    log = _log(run)
    val = [r for r in log if r["type"] == "val"]
    test = [r for r in log if r["type"] == "eval"]
    assert [r["epoch"] for r in val] == [1, 2, 3] and [r["epoch"] for r in test] == [3]
    ds = build_dataset("market1501", str(synthetic_root))
    _, val_set = hold_out_validation(ds, 2)
    assert all(r["dataset"] == "market1501-val2" and r["num_query"] == len(val_set.query) for r in val)
    best_epoch = max(val, key=lambda r: r["mAP"])["epoch"]
    best = load_checkpoint(run / "checkpoints" / "best.pth")
    assert best["epoch"] == best_epoch == result["best_epoch"]
    assert result["best_val_mAP"] == pytest.approx(max(r["mAP"] for r in val))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["epoch"] == 3 and ev["num_query"] == len(ds.query) and ev["mAP"] == pytest.approx(result["mAP"])
    model, _ = load_model(run / "checkpoints" / "last.pth", load_config(run / "config.yaml"))
    again = evaluate_model(model, ds, load_config(run / "config.yaml"))
    assert again["mAP"] == pytest.approx(result["mAP"], abs=1e-4)  # the last weights on the test split


def test_max_ids_trains_on_a_subset(synthetic_root, tmp_path):
    from attnreid.engine.trainer import train

    train(tiny_cfg(synthetic_root, "data.max_ids=3", "data.batch_size=4", "train.epochs=1"), tmp_path / "r",
          quiet=True)
    run = [r for r in _log(tmp_path / "r") if r["type"] == "run"][0]
    assert run["train_ids"] == 3


# ---------------------------------------------------------------- precision


def _record_forward_dtypes(monkeypatch):
    """Wrap the trainer's float32 cast to record the dtypes the forward produced, and the criterion to
    record whether it ran under autocast and on which dtype."""
    import attnreid.engine.trainer as trainer
    import attnreid.losses as losses

    seen = {"forward": set(), "criterion": set(), "autocast": set()}
    real_cast, real_build = trainer.to_float32, losses.build_criterion

    def cast(outputs):
        if isinstance(outputs, dict) and "logits" in outputs:
            seen["forward"].add(outputs["logits"]["global"].dtype)
        return real_cast(outputs)

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, outputs, targets):
            seen["criterion"].add(outputs["logits"]["global"].dtype)
            seen["autocast"].add(torch.is_autocast_enabled("cpu"))
            total, terms = self.inner(outputs, targets)
            seen["criterion"].add(total.dtype)
            return total, terms

    monkeypatch.setattr(trainer, "to_float32", cast)
    monkeypatch.setattr(losses, "build_criterion", lambda lc, mc: Recording(real_build(lc, mc)))
    return seen


def test_bf16_forward_float32_losses_and_the_choice_is_printed_and_logged(synthetic_root, tmp_path, monkeypatch,
                                                                          capsys):
    from attnreid.engine.trainer import train

    seen = _record_forward_dtypes(monkeypatch)
    result = train(tiny_cfg(synthetic_root, "train.amp=bf16", "train.epochs=1"), tmp_path / "r")
    assert seen == {"forward": {torch.bfloat16}, "criterion": {torch.float32}, "autocast": {False}}
    assert result["precision"] == "bf16" and math.isfinite(result["mAP"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("precision:")]
    assert lines == ["precision: bf16 autocast (train.amp=bf16)"]
    assert [r["precision"] for r in _log(tmp_path / "r") if r["type"] == "run"] == ["bf16"]


def test_auto_on_a_cpu_without_bf16_changes_nothing(synthetic_root, tmp_path, monkeypatch):
    """The no-bf16 path, forced: `auto` trains in float32, step for step the same as `off`."""
    import attnreid.precision as precision
    from attnreid.engine.trainer import train

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    for var in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)
    seen = _record_forward_dtypes(monkeypatch)
    auto = train(tiny_cfg(synthetic_root, "train.amp=auto"), tmp_path / "auto", quiet=True)
    assert seen["forward"] == {torch.float32}
    off = train(tiny_cfg(synthetic_root, "train.amp='off'"), tmp_path / "off", quiet=True)
    run = [r for r in _log(tmp_path / "auto") if r["type"] == "run"][0]
    assert run["precision"] == "fp32" and "neither AMX nor AVX512-BF16" in run["precision_reason"]
    losses = lambda d: [r["loss"] for r in _log(d) if r["type"] == "train"]  # noqa: E731
    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "off"), rel=1e-6)
    assert auto["mAP"] == pytest.approx(off["mAP"], abs=1e-6)


# ---------------------------------------------------------------- MHSA-Net diagnostics


def test_diagnostic_functions_on_hand_computed_inputs():
    from attnreid.engine.diagnostics import alpha_below, beta_entropy, head_overlap

    same = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]])
    disjoint = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    half = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]])  # each pair shares 0.5
    assert float(head_overlap(same)) == pytest.approx(1.0) and float(head_overlap(disjoint)) == 0.0
    assert float(head_overlap(half)) == pytest.approx(0.5) and head_overlap(same[:, :1]) is None
    assert float(alpha_below(same, 1e-3)) == pytest.approx(2 / 6)
    assert float(beta_entropy(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))) == 0.0
    assert float(beta_entropy(torch.full((2, 4), 0.25))) == pytest.approx(math.log(4))


def test_mhsanet_run_logs_diagnostics_every_epoch(synthetic_root, tmp_path):
    from attnreid.engine.trainer import train

    cfg = tiny_cfg(synthetic_root, "model.name=mhsanet", "model.mhsanet.num_heads=2",
                   "model.mhsanet.attention_dim=16", "model.mhsanet.embed_dim=16", "loss.lambda_fdrt=0")
    train(cfg, tmp_path / "r", quiet=True)
    diag = [r for r in _log(tmp_path / "r") if r["type"] == "diagnostics"]
    assert [r["epoch"] for r in diag] == [1, 2]
    for r in diag:
        assert 0.0 <= r["alpha_below_gamma"] <= 1.0 and 0.0 <= r["head_overlap"] <= 1.0 + 1e-6
        assert r["fdrt"] >= 0.0  # logged although its weight is 0
        assert len(r["beta_mean"]) == 2 and sum(r["beta_mean"]) == pytest.approx(1.0, abs=1e-2)  # bf16 softmax
        assert 0.0 <= r["beta_entropy"] <= math.log(2) + 1e-6
