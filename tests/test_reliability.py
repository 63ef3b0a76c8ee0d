"""Reliability: the faults real runs meet, and bad input, each answered in one line.

- training killed with SIGKILL mid-epoch and resumed loses at most one epoch and ends at
  the same config and schedule position;
- checkpoints: written atomically (a write that dies leaves the previous file intact),
  truncated / zero-byte / foreign files refused in one line, loaded with
  ``weights_only=True`` (a pickled object is refused and never executed);
- datasets: a corrupt or zero-byte JPEG is named (and skipped with
  data.skip_bad_images=true); query identities without a gallery match are counted;
- config typos, wrong types and out-of-range values name the key.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import assert_one_line_error, read_log, run_cli

# A tiny model at a tiny size: the point is the machinery, not the accuracy (nor the precision:
# float32, so that what a kill leaves behind never depends on the CPU's bf16 kernels, issue 25).
TINY = {
    "data": {"height": 64, "width": 32, "batch_size": 8, "num_instances": 2, "test_batch_size": 32,
             "workers": 0},
    "model": {"name": "baseline", "backbone": {"name": "resnet18", "last_stride": 2}},
    "train": {"device": "cpu", "threads": 1, "eval_every": 0, "log_every": 1, "amp": "off"},
    "eval": {"amp": "off"},
    "optim": {"warmup_epochs": 1, "milestones": [2], "lr": 3e-4},
}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The command sets torch's thread count (train.threads); give the rest of the suite its own back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _write_config(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(_merge(TINY, sections)))
    return path


def _market_folder(root: Path, num_ids: int = 4, per_id: int = 4, no_match: tuple = ()) -> Path:
    """A small Market-layout set of random-colour JPEGs: ``root/market1501/{train,query,gallery}``.

    Identity ``pid`` in ``no_match`` has a query but no gallery image.
    """
    base = root / "market1501"
    rng = np.random.default_rng(0)
    frame = 0
    for split, pids, cams in (("bounding_box_train", range(1, num_ids + 1), (1, 2)),
                              ("query", range(num_ids + 1, 2 * num_ids + 1), (1,)),
                              ("bounding_box_test", range(num_ids + 1, 2 * num_ids + 1), (2, 3))):
        (base / split).mkdir(parents=True, exist_ok=True)
        for pid in pids:
            if split == "bounding_box_test" and pid in no_match:
                continue
            n = 1 if split == "query" else per_id
            for k in range(n):
                frame += 1
                cam = cams[k % len(cams)]
                arr = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(base / split / f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg", quality=90)
    return root


def _save_tiny_checkpoint(path: Path, cfg_path: Path, num_classes: int = 4) -> Path:
    from attnreid.config import load_config, to_dict
    from attnreid.engine.checkpoint import save_checkpoint
    from attnreid.models import build_model

    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes)
    save_checkpoint(path, {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": num_classes,
                           "epoch": 1, "step": 1, "metrics": {}})
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A data root, a config reading it and a checkpoint of an untrained tiny model."""
    d = tmp_path_factory.mktemp("tiny")
    root = _market_folder(d / "data")
    cfg = _write_config(d / "tiny.yaml", data={"dataset": "market1501", "root": str(root)})
    ckpt = _save_tiny_checkpoint(d / "ckpt.pth", cfg)
    return {"dir": d, "root": root, "cfg": cfg, "ckpt": ckpt}


def _env() -> dict:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


# --- training killed with SIGKILL mid-epoch, then resumed ---------------------------------


def test_sigkill_mid_epoch_then_resume(tmp_path, synthetic_root):
    epochs, steps = 2, 6
    cfg = _write_config(tmp_path / "run.yaml",
                        data={"dataset": "market1501", "root": str(synthetic_root)},
                        train={"epochs": epochs, "max_steps_per_epoch": steps})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "attnreid", "train", str(cfg), "--out", str(run)]
    with open(tmp_path / "first.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_env())
        deadline = time.time() + 300  # a bound, not a timing: an idle machine gets there in seconds
        try:
            # Kill once epoch 2 has made a step: its checkpoint is not written yet.
            while time.time() < deadline and proc.poll() is None:
                if (run / "checkpoints" / "last.pth").is_file() and any(
                        r.get("type") == "train" and r.get("epoch") == 2 for r in read_log(run)):
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "training ended before it could be killed: " + (tmp_path / "first.err").read_text()
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    from attnreid.engine.checkpoint import load_checkpoint

    killed = load_checkpoint(run / "checkpoints" / "last.pth")
    started = max(r["epoch"] for r in read_log(run) if r.get("type") == "train")
    assert killed["epoch"] >= 1 and started == killed["epoch"] + 1, "the kill should land inside an epoch"
    steps = killed["step"] // killed["epoch"]
    config_before = (run / "config.yaml").read_text()

    # Resumed in-process (the CLI as a user runs it, without a second torch start-up).
    code, _, err = run_cli(["train", cfg, "--out", run, "--resume"])
    assert code == 0, err
    assert "Traceback" not in err
    log = read_log(run)
    resumed = [r for r in log if r.get("type") == "resume"]
    assert len(resumed) == 1 and resumed[0]["epoch"] >= started - 1, "resume lost more than one epoch"
    final = load_checkpoint(run / "checkpoints" / "last.pth")
    # Same schedule position as an uninterrupted run: all epochs, all steps, the same lr per epoch.
    assert final["epoch"] == epochs and final["step"] == epochs * steps
    assert final["scheduler"] == {**killed["scheduler"], "epoch": epochs - 1}
    from attnreid.config import load_config, to_dict
    from attnreid.engine.optim import WarmupStepScheduler

    cfg_obj = load_config(cfg)
    sched = WarmupStepScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg_obj.optim.lr), cfg_obj.optim)
    after = [r for r in log[log.index(resumed[0]):] if r.get("type") == "train"]
    assert {r["epoch"] for r in after} == set(range(killed["epoch"] + 1, epochs + 1))
    for r in after:
        assert r["lr"] == pytest.approx(sched.lr_at(r["epoch"] - 1))
    # Same config.
    assert (run / "config.yaml").read_text() == config_before
    assert final["config"] == killed["config"] == to_dict(cfg_obj)


# --- checkpoints --------------------------------------------------------------------------


class _Exploding:
    """Fails halfway through torch.save, like a disk filling up or a crash mid-write."""

    def __reduce__(self):
        raise OSError("no space left on device")


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    from attnreid.engine.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoints" / "last.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 1})
    with pytest.raises(OSError):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 2, "bad": _Exploding()})
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"], "a temporary file was left behind"


_WRITER = """
import sys, torch
from attnreid.engine.checkpoint import save_checkpoint
i = 0
while True:
    i += 1
    save_checkpoint(sys.argv[1], {"model": {"w": torch.full((1_000_000,), float(i))}, "epoch": i})
    print(i, flush=True)
"""


def test_sigkill_during_checkpoint_writes_never_leaves_a_truncated_file(tmp_path):
    from attnreid.engine.checkpoint import load_checkpoint

    path = tmp_path / "last.pth"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        for _ in range(3):
            assert proc.stdout.readline(), "the writer died"
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = load_checkpoint(path)
    w = state["model"]["w"]
    assert state["epoch"] >= 3 and bool((w == float(state["epoch"])).all())


def test_truncated_checkpoint_is_refused_and_the_good_one_still_loads(tiny, tmp_path):
    from attnreid.engine.checkpoint import load_checkpoint

    good = tmp_path / "checkpoints" / "best.pth"
    good.parent.mkdir()
    shutil.copy(tiny["ckpt"], good)
    bad = tmp_path / "checkpoints" / "last.pth"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(["robustness", tiny["cfg"], "--checkpoint", bad, "--levels", "0"])
    assert_one_line_error(code, err, str(bad), "truncated or corrupt")
    assert load_checkpoint(good)["num_classes"] == 4


class _Payload:
    """What an attacker would put in a checkpoint: code run at load time."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_a_pickled_object_is_refused_unexecuted(tiny, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = torch.load(tiny["ckpt"], weights_only=True)
    state["payload"] = _Payload(str(marker))
    torch.save(state, path)
    code, _, err = run_cli(["robustness", tiny["cfg"], "--checkpoint", path, "--levels", "0"])
    assert_one_line_error(code, err, str(path), "cannot be read safely")
    assert not marker.exists(), "loading the checkpoint ran code from it"


@pytest.mark.parametrize(
    "case, content, needle",
    [
        ("zero-byte", b"", "truncated or corrupt"),
        ("text", b"this is not a checkpoint\n", "truncated or corrupt"),
        ("tensor", "tensor", "no 'model' entry"),
        ("missing", None, "not found"),
    ],
)
def test_bad_checkpoint_files(tiny, tmp_path, case, content, needle):
    path = tmp_path / f"{case}.pth"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content is not None:
        path.write_bytes(content)
    code, _, err = run_cli(["robustness", tiny["cfg"], "--checkpoint", path, "--levels", "0"])
    assert_one_line_error(code, err, str(path), needle)


def test_checkpoint_of_another_model_is_refused(tiny, tmp_path):
    cfg = _write_config(tmp_path / "hacnn.yaml", data={"dataset": "market1501", "root": str(tiny["root"])},
                        model={"name": "hacnn"})
    code, _, err = run_cli(["eval", cfg, "--checkpoint", tiny["ckpt"]])
    assert_one_line_error(code, err, str(tiny["ckpt"]), "'baseline'", "'hacnn'")


def test_resume_without_a_run_is_refused(tiny, tmp_path):
    code, _, err = run_cli(["train", tiny["cfg"], "--out", tmp_path / "empty", "--resume"])
    assert_one_line_error(code, err, "nothing to resume", "last.pth")


# --- datasets -----------------------------------------------------------------------------


def _copy_root(tiny, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny["root"], root)
    return root


def _first_query(root: Path) -> Path:
    return sorted((root / "market1501" / "query").glob("*.jpg"))[0]


@pytest.mark.parametrize("kind", ["zero-byte", "corrupt"])
def test_bad_jpeg_is_named(tiny, tmp_path, kind):
    root = _copy_root(tiny, tmp_path)
    bad = _first_query(root)
    bad.write_bytes(b"" if kind == "zero-byte" else b"\xff\xd8\xff\xe0 definitely not a JPEG body")
    code, _, err = run_cli(["robustness", tiny["cfg"], "--checkpoint", tiny["ckpt"], "--root", root,
                            "--levels", "0", "--out", tmp_path / "out"])
    # A corrupt file is met while extracting, after the precision line (printed once per process,
    # so whether it shows here depends on the tests before): the error itself is one line.
    err = "\n".join(line for line in err.splitlines() if not line.startswith("inference precision: "))
    assert_one_line_error(code, err, bad.name)


@pytest.mark.parametrize("kind", ["zero-byte", "corrupt"])
def test_bad_jpeg_is_skipped_when_asked(tiny, tmp_path, kind):
    root = _copy_root(tiny, tmp_path)
    bad = _first_query(root)
    bad.write_bytes(b"" if kind == "zero-byte" else b"\xff\xd8\xff\xe0 definitely not a JPEG body")
    code, out, err = run_cli(["robustness", tiny["cfg"], "data.skip_bad_images=true", "--checkpoint", tiny["ckpt"],
                              "--root", root, "--levels", "0,0.2", "--kinds", "block", "--positions", "top",
                              "--out", tmp_path / "out", "--json"])
    assert code == 0, err
    assert "Traceback" not in err and bad.name in err, "the skipped file is listed on stderr"
    report = json.loads(out)
    assert report["num_query"] == 3 and bad.name in " ".join(report["skipped_images"])


def test_query_identities_without_gallery_match_are_counted(tmp_path):
    root = _market_folder(tmp_path / "data", no_match=(6, 8))
    cfg = _write_config(tmp_path / "c.yaml", data={"dataset": "market1501", "root": str(root)})
    ckpt = _save_tiny_checkpoint(tmp_path / "c.pth", cfg)
    code, out, err = run_cli(["robustness", cfg, "--checkpoint", ckpt, "--levels", "0,0.3", "--kinds", "erasing",
                              "--positions", "side", "--out", tmp_path / "out", "--json"])
    assert code == 0, err
    for row in json.loads(out)["models"][0]["conditions"]:
        assert row["num_skipped_queries"] == 2 and row["num_valid_queries"] == 2
    from attnreid.evaluation.protocols import evaluate

    q = np.array([1, 2, 3])
    g = np.array([1, 1, 2])
    result = evaluate(torch.zeros(3, 4), torch.randn(3, 4), q, g, np.zeros(3, int), np.ones(3, int))
    assert result["num_skipped_queries"] == 1 and result["num_valid_queries"] == 2


def test_unknown_dataset_and_missing_root(tiny, tmp_path):
    code, _, err = run_cli(["robustness", tiny["cfg"], "--checkpoint", tiny["ckpt"], "--dataset", "market1502"])
    assert_one_line_error(code, err, "market1502", "market1501")
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(["robustness", tiny["cfg"], "--checkpoint", tiny["ckpt"], "--root", missing])
    assert_one_line_error(code, err, str(missing))


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "yaml_text, override, needles",
    [
        ("loss:\n  lambda_fdr: 0.1\n", None, ("loss.lambda_fdr", "did you mean 'loss.lambda_fdrt'")),
        (None, "model.mhsanet.num_head=4", ("model.mhsanet.num_head", "did you mean 'model.mhsanet.num_heads'")),
        (None, "train.epochs=abc", ("train.epochs",)),
        ("data:\n  height: tall\n", None, ("data.height",)),
        (None, "optim.lr=0", ("optim.lr", "> 0")),
        (None, "data.random_erasing=1.5", ("data.random_erasing", "<= 1.0")),
        (None, "model.name=resnet", ("model.name", "baseline, mhsanet, hacnn")),
        ("model: 3\n", None, ("model", "section")),
    ],
    ids=["typo-file", "typo-override", "type-override", "type-file", "range-low", "range-high", "choice",
         "section-scalar"],
)
def test_bad_config_names_the_key(tiny, tmp_path, yaml_text, override, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text or "train:\n  epochs: 1\n")
    args = ["robustness", cfg] + ([override] if override else []) + ["--checkpoint", tiny["ckpt"]]
    code, _, err = run_cli(args)
    assert_one_line_error(code, err, *needles)


def test_config_file_missing_or_not_yaml(tiny, tmp_path):
    code, _, err = run_cli(["robustness", tmp_path / "nope.yaml", "--checkpoint", tiny["ckpt"]])
    assert_one_line_error(code, err, "config file not found", "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [1, 2\n")
    code, _, err = run_cli(["train", broken])
    assert_one_line_error(code, err, "broken.yaml", "not valid YAML")


@pytest.mark.parametrize(
    "option, value, needle",
    [("--levels", "0,200", "--levels"), ("--kinds", "block,car", "--kinds: 'car'"),
     ("--positions", "middle", "--positions: 'middle'")],
)
def test_bad_robustness_options(tiny, option, value, needle):
    code, _, err = run_cli(["robustness", tiny["cfg"], "--checkpoint", tiny["ckpt"], option, value])
    assert_one_line_error(code, err, needle)
