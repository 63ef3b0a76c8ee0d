"""`attnreid train / eval / extract`: the happy path once, then every bad input as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from helpers import assert_one_line_error, run_cli

TINY = {
    "data": {"dataset": "market1501", "height": 64, "width": 32, "batch_size": 8, "num_instances": 2,
             "test_batch_size": 32, "workers": 0},
    "model": {"name": "baseline", "backbone": {"name": "mobilenetv3_small"}},
    "optim": {"warmup_epochs": 0, "lr": 3e-4, "milestones": []},
    "train": {"epochs": 1, "max_steps_per_epoch": 2, "eval_every": 0, "device": "cpu", "threads": 1},
}


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A config file and a run trained through the CLI (shared by the tests below)."""
    base = tmp_path_factory.mktemp("cli")
    cfg = dict(TINY, data=dict(TINY["data"], root=str(synthetic_root)))
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = base / "run"
    code, out, err = run_cli(["train", config, "--out", run])
    assert code == 0, err
    assert "completed: 1 epoch, 2 steps" in out and "R1" in out and "mAP" in out
    return config, run


def test_train_writes_effective_config(trained):
    config, run = trained
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["backbone"]["name"] == "mobilenetv3_small" and saved["train"]["epochs"] == 1
    assert saved["loss"]["lambda_fdrt"] == 1e-4  # defaults filled in: the full effective config


def test_out_dir_holding_another_run_is_refused(trained):
    config, run = trained
    code, _, err = run_cli(["train", config, "--out", run])
    assert_one_line_error(code, err, str(run), "already holds a run", "--resume", "--overwrite")


def test_unknown_config_key_and_missing_dataset(trained, tmp_path):
    config, _ = trained
    code, _, err = run_cli(["train", config, "model.mhsanet.num_head=3", "--out", tmp_path / "a"])
    assert_one_line_error(code, err, "model.mhsanet.num_head", "did you mean 'model.mhsanet.num_heads'")
    missing = tmp_path / "no_such_root"
    code, _, err = run_cli(["train", config, f"data.root={missing}", "--out", tmp_path / "b"])
    assert_one_line_error(code, err, str(missing))


def test_eval_json_and_files(trained, tmp_path):
    config, run = trained
    code, out, err = run_cli(["eval", config, "--checkpoint", run / "checkpoints" / "last.pth", "--json",
                              "--out", tmp_path / "ev"])
    assert code == 0, err
    m = json.loads(out)  # exactly one JSON object on stdout
    assert {"rank1", "rank5", "rank10", "mAP"} <= set(m) and m["model"] == "baseline"
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["mAP"] == pytest.approx(m["mAP"])
    assert np.load(tmp_path / "ev" / "eval_ranks.npz")["topk_index"].ndim == 2
    code, out, err = run_cli(["eval", config, "--checkpoint", run / "checkpoints" / "last.pth"])
    assert code == 0 and "R1" in out and "R10" in out and "mAP" in out, err
    assert not (run / "checkpoints" / "best.pth").exists()  # no data.val_ids: no model selection


def test_eval_checkpoint_of_another_model(trained):
    config, run = trained
    code, _, err = run_cli(["eval", config, "model.name=mhsanet", "--checkpoint", run / "checkpoints" / "last.pth"])
    assert_one_line_error(code, err, "last.pth", "'baseline'", "'mhsanet'")
    code, _, err = run_cli(["eval", config, "model.backbone.name=resnet18",
                            "--checkpoint", run / "checkpoints" / "last.pth"])
    assert_one_line_error(code, err, "last.pth", "does not fit")


def test_eval_corrupt_checkpoint(trained, tmp_path):
    config, _ = trained
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run_cli(["eval", config, "--checkpoint", bad])
    assert_one_line_error(code, err, "bad.pth")


def test_extract_split_feeds_metrics_and_folder(trained, tmp_path, synthetic_root):
    config, run = trained
    ck = run / "checkpoints" / "last.pth"
    npz = tmp_path / "f.npz"
    code, out, err = run_cli(["extract", config, "--checkpoint", ck, "--split", "query", "--split", "gallery",
                              "--out", npz])
    assert code == 0, err
    arrays = np.load(npz)
    assert arrays["query_features"].shape[0] == len(arrays["query_pids"]) == len(arrays["query_camids"])
    code, out, err = run_cli(["metrics", npz, "--json"])
    assert code == 0, err
    assert 0.0 <= json.loads(out)["mAP"] <= 1.0
    folder = next(p.parent for p in sorted(synthetic_root.rglob("*.jpg")) if p.parent.name == "query")
    code, out, err = run_cli(["extract", config, "--checkpoint", ck, "--folder", folder, "--out", tmp_path / "d.npz"])
    assert code == 0, err
    d = np.load(tmp_path / "d.npz")
    assert d["features"].shape[0] == len(d["paths"]) == len(list(folder.glob("*.jpg")))
    code, _, err = run_cli(["extract", config, "--checkpoint", ck, "--out", tmp_path / "e.npz"])
    assert_one_line_error(code, err, "--split", "--folder")


def test_ctrl_c_saves_and_exits_with_one_line(trained, tmp_path, monkeypatch):
    import attnreid.engine.trainer as trainer

    config, _ = trained
    real, calls = trainer.train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted_step)
    run = tmp_path / "r"
    code, _, err = run_cli(["train", config, "train.epochs=2", "--out", run])
    lines = err.strip().splitlines()
    assert code == 130 and len(lines) == 1 and "Traceback" not in err
    assert "interrupted" in lines[0] and "last.pth" in lines[0] and "--resume" in lines[0]
    assert (run / "checkpoints" / "last.pth").is_file()
    monkeypatch.setattr(trainer, "train_step", real)
    code, out, err = run_cli(["train", config, "train.epochs=2", "--out", run, "--resume"])
    assert code == 0 and "completed: 2 epochs" in out, err


def test_nan_loss_is_one_line(trained, tmp_path, monkeypatch):
    import torch

    import attnreid.losses as losses

    config, _ = trained
    real = losses.build_criterion

    class InfiniteCE(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, outputs, targets):
            total, terms = self.inner(outputs, targets)
            return total * float("inf"), dict(terms, ce_global=torch.tensor(float("inf")))

    def infinite_ce(loss_cfg, model_cfg):
        return InfiniteCE(real(loss_cfg, model_cfg))

    monkeypatch.setattr(losses, "build_criterion", infinite_ce)
    code, _, err = run_cli(["train", config, "--out", tmp_path / "n"])
    assert_one_line_error(code, err, "step 1", "'ce_global'", "inf")
