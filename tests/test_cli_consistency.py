"""Issue 31: every command takes a model the same way, says how to go on after Ctrl-C, survives
a closed pipe, and its messages and metadata say what happened (docs/training.md, "Naming a
model"). The docs' examples themselves run in tests/test_docs.py."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "data": {"dataset": "market1501", "height": 64, "width": 32, "batch_size": 8, "num_instances": 2,
             "test_batch_size": 32, "workers": 0},
    "model": {"name": "mhsanet", "backbone": {"name": "mobilenetv3_small"}, "mhsanet": {"num_heads": 2}},
    "optim": {"warmup_epochs": 0, "lr": 3e-4, "milestones": []},
    "train": {"epochs": 1, "max_steps_per_epoch": 2, "eval_every": 0, "device": "cpu", "threads": 1},
}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(synthetic_root, tmp_path_factory):
    """A run folder (config.yaml + checkpoints/last.pth of an untrained tiny MHSA-Net, 5 classes),
    the same config outside it, and a query image."""
    from attnreid.config import load_config, to_dict
    from attnreid.engine.checkpoint import save_checkpoint
    from attnreid.models import build_model

    d = tmp_path_factory.mktemp("model")
    config = d / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "root": str(synthetic_root)}}))
    cfg = load_config(config)
    run = d / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config.read_text())
    torch.manual_seed(0)
    net = build_model(cfg.model, 5)
    ckpt = save_checkpoint(run / "checkpoints" / "last.pth", {"model": net.state_dict(), "config": to_dict(cfg),
                                                              "num_classes": 5, "epoch": 1, "step": 2})
    query = sorted((Path(synthetic_root) / "market1501" / "query").glob("*.jpg"))[0]
    return {"dir": d, "config": config, "run": run, "ckpt": ckpt, "query": query, "root": synthetic_root}


# --- 2/3. one rule wherever a model is named --------------------------------------------------

def _three_ways(m):
    """A run folder, its checkpoint, the config plus --checkpoint: the same model."""
    return [[m["run"]], [m["ckpt"]], [m["config"], "--checkpoint", m["ckpt"]]]


def test_eval_takes_a_run_folder_a_checkpoint_or_a_config(model):
    maps = []
    for named in _three_ways(model):
        code, out, err = run_cli(["eval", *named, "--json", "eval.bootstrap=0"])
        assert code == 0, err
        maps.append(json.loads(out)["mAP"])
    assert maps[0] == maps[1] == maps[2]


def test_overrides_apply_to_the_config_of_a_run_or_checkpoint(model):
    for named in ([model["run"]], [model["ckpt"]]):
        code, out, err = run_cli(["model-info", *named, "model.test_feature=star", "--json"])
        assert code == 0, err
        info = json.loads(out)
        assert info["feature_dim"] == 512 and info["num_classes"] == 5  # the checkpoint's class count
    code, out, err = run_cli(["model-info", model["config"], "--json"])  # a config: no weights needed
    assert code == 0 and json.loads(out)["num_classes"] == 751, err


def test_export_takes_a_run_folder_and_overrides(model, tmp_path, monkeypatch):
    """The override reaches the exported model (the export itself: tests/test_deploy_export.py)."""
    import attnreid.inference.export as onnx_export

    exported = {}

    def fake_export(net, out, input_size, **kwargs):
        exported.update(feature_dim=net.feature_dim, input_size=list(input_size), metadata=kwargs["metadata"])
        return {"onnx": str(out)}

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    code, _, err = run_cli(["export", model["run"], "model.test_feature=star", "--out", tmp_path / "m.onnx", "--json"])
    assert code == 0, err
    assert exported["feature_dim"] == int(exported["metadata"]["feature_dim"]) == 512  # p* alone, not cat(p*, q*)
    assert exported["input_size"] == [64, 32]


def test_explain_and_index_build_take_a_run_folder(model, tmp_path):
    code, out, err = run_cli(["explain", model["run"], model["query"], "model.mhsanet.fusion=saffm",
                              "--out", tmp_path / "ex", "--json", "--device", "cpu"])
    assert code == 0, err
    assert len(json.loads(out)["images"]) == 1
    gallery = Path(model["root"]) / "market1501" / "query"
    code, out, err = run_cli(["index", "build", gallery, "--checkpoint", model["run"], "--out", tmp_path / "idx",
                              "--json", "--device", "cpu"])
    assert code == 0, err
    assert json.loads(out)["num_vectors"] == len(list(gallery.glob("*.jpg")))


def test_robustness_takes_run_folders_and_checkpoints(model, tmp_path):
    args = ["--levels", "0,0.2", "--kinds", "block", "--positions", "top", "--json"]
    code, out, err = run_cli(["robustness", model["run"], model["ckpt"], *args, "--out", tmp_path / "r"])
    assert code == 0, err
    report = json.loads(out)
    assert len(report["models"]) == 2 and report["levels"] == [0.0, 20.0]
    code, _, err = run_cli(["robustness", model["config"], "--checkpoint", model["ckpt"], *args,
                            "--out", tmp_path / "r2"])  # the old spelling: CONFIG --checkpoint CKPT
    assert code == 0, err


@pytest.mark.parametrize("command", ["eval", "extract", "export", "explain", "model-info", "robustness"])
def test_a_checkpoint_where_a_config_was_is_never_a_traceback(model, tmp_path, command):
    """Before: a 46-line UnicodeDecodeError. Now a checkpoint is a model, and a config file that is
    not text is one line."""
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(Path(model["ckpt"]).read_bytes()[:4096])
    extra = {"extract": ["--split", "query", "--out", tmp_path / "f.npz"], "export": ["--out", tmp_path / "m.onnx"],
             "explain": [model["query"], "--out", tmp_path / "ex"]}.get(command, [])
    code, _, err = run_cli([command, binary, *extra, "--checkpoint", model["ckpt"]])
    assert_one_line_error(code, err, str(binary), "not a YAML text file")


def test_bad_model_arguments_are_one_line(model, tmp_path):
    code, _, err = run_cli(["eval", model["config"]])
    assert_one_line_error(code, err, "needs --checkpoint")
    code, _, err = run_cli(["eval", model["ckpt"], "--checkpoint", model["ckpt"]])
    assert_one_line_error(code, err, "already a checkpoint")
    code, _, err = run_cli(["eval", tmp_path / "nothing"])
    assert_one_line_error(code, err, "not found", "run folder")
    code, _, err = run_cli(["eval", "data.root=x", model["run"]])
    assert_one_line_error(code, err, "'data.root=x'", "the model comes first")
    code, _, err = run_cli(["eval", tmp_path])
    assert_one_line_error(code, err, "not a run folder")
    empty_run = tmp_path / "started"
    (empty_run / "checkpoints").mkdir(parents=True)
    (empty_run / "config.yaml").write_text(Path(model["config"]).read_text())
    code, _, err = run_cli(["eval", empty_run])
    assert_one_line_error(code, err, "has no checkpoints/last.pth")
    code, _, err = run_cli(["eval", model["run"] / "checkpoints"])
    assert_one_line_error(code, err, "holds checkpoints", f"or the run folder {model['run']}")
    code, _, err = run_cli(["index", "build", tmp_path, "--checkpoint", model["config"], "--out", tmp_path / "i"])
    assert_one_line_error(code, err, "is a config: give it with --config")


def test_unknown_dataset_gets_a_suggestion(tmp_path):
    for typed in ("Market1501", "market", "DukeMTMC-reID"):
        code, _, err = run_cli(["data", "stats", typed, "--root", tmp_path])
        assert_one_line_error(code, err, f"unknown dataset '{typed}'", "did you mean '")
    assert "did you mean 'market1501'" in run_cli(["data", "stats", "Market1501", "--root", tmp_path])[2]


def test_train_given_a_run_or_checkpoint_says_what_to_do(model):
    code, _, err = run_cli(["train", model["run"]])
    assert_one_line_error(code, err, "attnreid train --resume --out")
    code, _, err = run_cli(["train", model["ckpt"]])
    assert_one_line_error(code, err, "not a .yaml config")


def test_metrics_on_a_run_says_where_its_metrics_are(model):
    for target in (model["run"], model["run"] / "eval_per_query.npz"):
        code, _, err = run_cli(["metrics", target])
        assert_one_line_error(code, err, "eval.json", f"attnreid extract {model['run']} --split query")


def test_feature_extractor_takes_a_run_folder(model):
    from attnreid import FeatureExtractor

    a = FeatureExtractor(model["run"], amp="off")
    b = FeatureExtractor(model["ckpt"], amp="off")
    x = torch.rand(1, 3, 64, 32)
    assert torch.equal(a(x), b(x))


# --- 1. Ctrl-C: exit 130 and one line saying how to go on ----------------------------------------

def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_in_robustness_and_index_build_says_how_to_go_on(model, tmp_path, monkeypatch):
    import attnreid.deploy.index as index
    import attnreid.robustness.report as report

    monkeypatch.setattr(report, "run_robustness", _interrupt)
    code, _, err = run_cli(["robustness", model["run"], "--levels", "0", "--out", tmp_path / "r"])
    assert code == 130 and err.count("\n") == 1 and "run the same command again" in err, err
    monkeypatch.setattr(index, "build_index", _interrupt)
    code, _, err = run_cli(["index", "build", tmp_path, "--checkpoint", model["run"], "--out", tmp_path / "i",
                            "--device", "cpu"])
    assert code == 130 and err.count("\n") == 1 and "run the same command again" in err, err


def test_ctrl_c_during_the_demo_is_one_line_not_a_key_error(synthetic_root, tmp_path, monkeypatch):
    """train() catches Ctrl-C, saves last.pth and returns status 'interrupted' without the
    training figures; the demo used to read img_per_s from it (KeyError)."""
    import attnreid.data.datasets as datasets
    import attnreid.engine.trainer as trainer

    small = datasets.build_dataset("market1501", str(synthetic_root))
    monkeypatch.setattr(datasets, "build_dataset_from_config", lambda data_cfg: small)

    def interrupted_train(cfg, run_dir, **kwargs):
        return {"status": "interrupted", "epoch": 0, "step": 3, "run_dir": str(run_dir),
                "checkpoint": str(Path(run_dir) / "checkpoints" / "last.pth")}

    monkeypatch.setattr(trainer, "train", interrupted_train)
    code, out, err = run_cli(["demo", "--out", tmp_path / "demo", "--minutes", "1"])
    assert code == 130 and "Traceback" not in err and "KeyError" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted; ") and "attnreid demo" in err


# --- 6. piped output ----------------------------------------------------------------------------

def test_a_closed_pipe_does_not_stop_the_work():
    from attnreid.cli._util import PipeSafeStream

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    stream = PipeSafeStream(Closed())
    assert stream.write("epoch 1\n") == len("epoch 1\n")
    stream.flush()
    assert stream.broken and stream.write("more\n") == 5


def test_train_piped_into_a_closed_pipe_still_trains_and_checkpoints(model, tmp_path):
    """`attnreid train ... | head -2`: the reader is gone before the first line, by construction
    (the read end is closed before the process starts), so every write meets EPIPE."""
    read, write = os.pipe()
    os.close(read)
    run = tmp_path / "run"
    try:
        proc = subprocess.run([sys.executable, "-m", "attnreid", "train", model["config"], "--out", run],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert (run / "checkpoints" / "last.pth").is_file() and (run / "eval.json").is_file()


def test_demo_console_does_not_wrap_a_pipe_at_80_columns():
    from attnreid.apps.demo import demo_console

    out = io.StringIO()
    line = "attnreid demo: synthetic occluded set, baseline, mhsanet, hacnn on the CPU, budget 1.5 min " * 2
    demo_console(quiet=False, file=out).print(line)
    assert out.getvalue() == line + "\n"


def test_plurals():
    from attnreid.text import plural, the_first

    assert (plural(1, "epoch"), plural(2, "epoch"), plural(0, "query", "queries")) == ("1 epoch", "2 epochs",
                                                                                        "0 queries")
    assert (the_first(1, "image"), the_first(6, "image")) == ("the first image", "the first 6 images")


def test_one_query_searched_is_the_first_image(model, tmp_path):
    gallery = Path(model["root"]) / "market1501" / "query"
    code, _, err = run_cli(["index", "build", gallery, "--checkpoint", model["ckpt"], "--out", tmp_path / "idx",
                            "--device", "cpu"])
    assert code == 0, err
    code, out, err = run_cli(["search", tmp_path / "idx", model["query"], "--top-k", "2", "--device", "cpu"])
    assert code == 0, err
    assert "first 1 image" not in err and "top 2 of" in out


# --- 7. metadata that says what happened ----------------------------------------------------------

def test_index_meta_lists_every_backend_that_made_vectors():
    from attnreid.deploy.index import _record_backend

    meta = {"backend": "onnxruntime", "precision": "float32 (onnxruntime runs the exported float32 graph)"}
    # an index from before the field: its 1000 vectors came from its one backend
    _record_backend(meta, {"backend": "torch", "precision": "bf16 autocast (CPU has AMX; ...)"}, 24, 1000)
    assert meta["backends"] == [{"backend": "onnxruntime", "precision": "float32", "vectors": 1000},
                                {"backend": "torch", "precision": "bf16 autocast", "vectors": 24}]
    _record_backend(meta, {"backend": "torch", "precision": "bf16 autocast (other reason)"}, 6, 1024)
    _record_backend(meta, {"backend": "onnxruntime", "precision": "float32 (x)"}, 0, 1030)  # added nothing
    assert [e["vectors"] for e in meta["backends"]] == [1000, 30]


def test_resumed_index_build_records_both_precisions(model, tmp_path):
    import shutil

    gallery = tmp_path / "gallery"
    images = sorted((Path(model["root"]) / "market1501" / "query").glob("*.jpg"))
    gallery.mkdir()
    for p in images[:3]:
        shutil.copy(p, gallery)
    base = ["index", "build", gallery, "--checkpoint", model["run"], "--out", tmp_path / "idx", "--device", "cpu"]
    assert run_cli(base + ["--amp", "off"])[0] == 0
    for p in images[3:5]:
        shutil.copy(p, gallery)
    code, _, err = run_cli(base + ["--amp", "bf16"])
    assert code == 0, err
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert [(e["precision"], e["vectors"]) for e in meta["backends"]] == [("float32", 3), ("bf16 autocast", 2)]


def test_demo_table_shows_training_and_inference_precision_apart():
    from rich.console import Console

    from attnreid.apps.demo import _row, results_table

    result = {"epoch": 2, "step": 9, "train_seconds": 10.0, "img_per_s": 30.0, "status": "completed",
              "precision": "bf16", "rank1": 0.5, "rank5": 0.7, "mAP": 0.4, "mINP": 0.2}
    row = _row("baseline", "default", result, Path("r"), "float32 (eval.amp=off)")
    assert (row["train_precision"], row["inference_precision"]) == ("bf16", "float32 (eval.amp=off)")
    out = io.StringIO()
    Console(file=out, width=200).print(results_table([row], {"rank1": 0.1, "mAP": 0.1}, {}, 6, 30))
    assert "precision train / test" in out.getvalue() and "bf16 / fp32" in out.getvalue()


def test_robustness_levels_are_fractions_or_per_cent():
    from attnreid.errors import AttnReidError
    from attnreid.robustness.report import parse_levels

    assert parse_levels("0.1,0.2") == parse_levels("10%,20%") == [0.1, 0.2]
    assert parse_levels("0,1,0.5") == [0.0, 0.5, 1.0]
    for bad, needle in (("0,10,20", "10 is ambiguous"), ("150%", "outside 0%..100%"), ("-0.1", "outside 0..1"),
                        ("ten", "not a number")):
        with pytest.raises(AttnReidError, match=needle):
            parse_levels(bad)


def test_robustness_ambiguous_level_is_one_line(model):
    code, _, err = run_cli(["robustness", model["run"], "--levels", "0,20"])
    assert_one_line_error(code, err, "--levels", "20 is ambiguous", "20%", "0.2")


# --- 5. the report ------------------------------------------------------------------------------

def _log(records):
    return [dict(r, step=r["epoch"] * 4) for r in records]


def test_training_chart_shows_the_validation_evaluations():
    from attnreid.viz.plots import training_figure, training_series

    records = _log([{"type": "train", "epoch": e, "loss": 6.0 - 0.1 * e} for e in (1, 2, 3)]
                   + [{"type": "val", "epoch": e, "rank1": 0.1 * e, "mAP": 0.05 * e} for e in (1, 2, 3)]
                   + [{"type": "eval", "epoch": 3, "rank1": 0.3, "mAP": 0.2}])
    s = training_series(records)
    assert s["val_epochs"] == [1, 2, 3] and s["val"]["mAP"] == pytest.approx([0.05, 0.1, 0.15])
    assert s["eval_epochs"] == [3]
    fig = training_figure(s)
    labels = [line.get_label() for line in fig.axes[1].get_lines()]
    assert labels == ["Rank-1 (validation)", "mAP (validation)", "Rank-1 (test)", "mAP (test)"]
    assert len(fig.axes[1].get_lines()[0].get_xdata()) == 3


def test_log_axis_ticks_are_plain_numbers():
    import matplotlib.pyplot as plt

    from attnreid.viz.plots import training_figure, training_series

    # a loss that stays within one decade: every tick is a non-decade one
    s = training_series(_log([{"type": "train", "epoch": e, "loss": v} for e, v in ((1, 6.3), (2, 6.1), (3, 5.9))]))
    fig = training_figure(s)
    fig.canvas.draw()
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
    plt.close(fig)
    assert ax.get_yscale() == "log" and texts
    assert not [t for t in texts if "times" in t or "^" in t], texts
    assert "$\\mathdefault{6}$" in texts


def test_beta_entropy_of_one_hot_is_zero_not_minus_zero():
    from attnreid.evaluation.attention_stats import beta_entropy
    from attnreid.viz.attention import diversity_text

    value = beta_entropy(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert f"{value:.2f}" == "0.00"
    assert "β entropy 0.00 of" in diversity_text({"beta_entropy": -0.0, "beta_entropy_max": 1.1})


def test_report_queries_out_of_range_is_one_line(model, tmp_path):
    evaluated = tmp_path / "evaluated"
    code, _, err = run_cli(["eval", model["run"], "--out", evaluated, "eval.bootstrap=0"])
    assert code == 0, err
    code, _, err = run_cli(["report", evaluated, "--queries", "0,17,999", "--out", tmp_path / "rep"])
    q = len(np.load(evaluated / "eval_ranks.npz")["query_paths"])
    assert_one_line_error(code, err, "--queries 17,999 out of range", f"has {q} queries")
    assert not (tmp_path / "rep" / "index.html").exists()


# --- 8. small ones -----------------------------------------------------------------------------

def _command_paths(cmd, path=()):
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _command_paths(sub, path + (name,))


def test_every_command_takes_dash_h():
    import typer

    from attnreid.cli import app

    root = typer.main.get_command(app)
    paths = list(_command_paths(root))
    assert len(paths) > 15
    for path in paths:  # every command inherits the root's help options
        cmd, ctx = root, root.make_context("attnreid", [], resilient_parsing=True)
        for name in path:
            cmd = cmd.commands[name]
            ctx = cmd.make_context(name, [], parent=ctx, resilient_parsing=True)
        assert "-h" in cmd.get_help_option(ctx).opts, path
    for path in ([], ["eval"], ["index", "build"]):
        code, out, err = run_cli([*path, "-h"])
        assert code == 0 and "Usage" in out, (path, err)


def test_data_stats_synthetic_says_it_generated_the_set(tmp_path):
    code, out, err = run_cli(["data", "stats", "synthetic", "--root", tmp_path, "--json"])
    assert code == 0, err
    assert json.loads(out)["train"]["ids"] == 30  # stdout stays one JSON object
    assert "generated it" in err and str(tmp_path) in err
    code, _, err = run_cli(["data", "stats", "synthetic", "--root", tmp_path, "--json"])
    assert code == 0 and "generated" not in err


def test_data_synth_names_its_options(tmp_path):
    code, _, err = run_cli(["data", "synth", "--out", tmp_path, "--cameras", "12"])
    assert_one_line_error(code, err, "--cameras is 12", "<= 9")
    assert "num_cameras" not in err
    code, _, err = run_cli(["data", "synth", "--out", tmp_path, "--ids", "1"])
    assert_one_line_error(code, err, "--ids is 1")


def test_upper_case_key_gets_a_suggestion(model):
    code, _, err = run_cli(["eval", model["run"], "DATA.ROOT=x"])
    assert_one_line_error(code, err, "'DATA.ROOT'", "did you mean 'data.root'")


def test_failed_train_leaves_no_folder_it_made(model, tmp_path):
    out = tmp_path / "a" / "b" / "run"
    code, _, err = run_cli(["train", model["config"], f"data.root={tmp_path / 'missing'}", "--out", out])
    assert_one_line_error(code, err, "missing")
    assert not (tmp_path / "a").exists()
    mine = tmp_path / "mine"  # a folder the user made is theirs, even empty
    mine.mkdir()
    code, _, _ = run_cli(["train", model["config"], f"data.root={tmp_path / 'missing'}", "--out", mine])
    assert code == 2 and mine.is_dir()


def test_train_says_1_epoch_and_resume_takes_the_run_folder(model, tmp_path):
    code, out, err = run_cli(["train", model["config"], "--out", tmp_path / "run"])
    assert code == 0, err
    assert "completed: 1 epoch, 2 steps" in out and "1 epochs" not in out
    # `attnreid train --resume RUN`: the run folder where --out was expected
    code, out, err = run_cli(["train", "--resume", tmp_path / "run", "train.epochs=2"])
    assert code == 0, err
    assert "completed: 2 epochs, 4 steps" in out


def test_compare_verdict_names_the_runs(tmp_path):
    from test_apps_demo import _feature_file

    good = _feature_file(tmp_path / "good.npz", 0.6)
    bad = _feature_file(tmp_path / "bad.npz", 1.6)
    code, out, err = run_cli(["compare", good, bad])
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "verdict: good.npz better (decided on mAP)"
    code, out, _ = run_cli(["compare", good, bad, "--json"])
    assert json.loads(out)["winner"] == "A"


def test_torchreid_names_point_to_ours():
    """A user coming from torchreid types its keys: the error names ours, not the nearest spelling."""
    from attnreid.config import TORCHREID_KEYS, _all_keys, load_config
    from attnreid.errors import ConfigError

    keys = set(_all_keys())
    named = [k for v in TORCHREID_KEYS.values() for k in re.findall(r"\b(?:data|model|loss|optim|train|eval)\.[a-z_.]*[a-z]", v or "")]
    assert named and set(named) <= keys  # every key the hints name exists
    assert not set(TORCHREID_KEYS) & keys
    for typed, ours in (("data.sources=market1501", "data.dataset"), ("train.lr=0.1", "optim.lr"),
                        ("train.max_epoch=60", "train.epochs"), ("test.rerank=true", "eval.rerank")):
        with pytest.raises(ConfigError, match=f"torchreid's name, attnreid's is {ours}"):
            load_config(None, [typed])
