"""Issue 17: every command behaves like a well-kept CLI.

Output paths are checked before any work; --opset is honoured or refused; skipped
images are counted apart from queries without a match; command-line overrides are
blamed for their own errors and keep string values as typed; no object reprs in
messages; progress on long steps; the conventions of --help; data.workers: auto; the
report's worst queries and training curve; several test sets in one evaluation.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import assert_one_line_error, run_cli
from test_reliability import TINY, _market_folder, _save_tiny_checkpoint, _write_config

from attnreid.config import load_config, parse_override_value
from attnreid.data.loader import resolve_workers
from attnreid.errors import AttnReidError, ConfigError, DataError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A data root with the same tiny set as Market-1501 and as DukeMTMC-reID, a config, a checkpoint."""
    d = tmp_path_factory.mktemp("polish")
    root = _market_folder(d / "data")
    shutil.copytree(root / "market1501", root / "DukeMTMC-reID")
    cfg = _write_config(d / "tiny.yaml", data={"dataset": "market1501", "root": str(root)})
    ckpt = _save_tiny_checkpoint(d / "ckpt.pth", cfg)
    a_file = d / "some_file.yaml"
    a_file.write_text("x: 1\n")
    return {"dir": d, "root": root, "cfg": cfg, "ckpt": ckpt, "file": a_file}


# --- 1. output paths are checked before the work starts ---------------------------------


def test_extract_to_an_unwritable_place_fails_before_any_work(small):
    # The checkpoint does not even exist: the output path is checked first.
    code, out, err = run_cli(["extract", small["cfg"], "--checkpoint", small["dir"] / "nope.pth",
                              "--split", "query", "--out", "/proc/feats.npz"])
    assert_one_line_error(code, err, "--out /proc/feats.npz", "cannot be written")
    assert out == ""


def test_report_under_a_file_is_one_line(small, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: baseline}\n")
    code, _, err = run_cli(["report", run, "--out", f"{small['file']}/rep"])
    assert_one_line_error(code, err, "--out", "some_file.yaml is a file, not a folder")


@pytest.mark.parametrize("command", [
    lambda s, out: ["extract", s["cfg"], "--checkpoint", s["ckpt"], "--split", "query", "--out", out / "f.npz"],
    lambda s, out: ["eval", s["cfg"], "--checkpoint", s["ckpt"], "--out", out],
    lambda s, out: ["export", s["ckpt"], "--out", out / "m.onnx"],
    lambda s, out: ["index", "build", s["root"], "--checkpoint", s["ckpt"], "--out", out],
    lambda s, out: ["explain", s["cfg"], s["file"], "--checkpoint", s["ckpt"], "--out", out],
    lambda s, out: ["robustness", s["cfg"], "--checkpoint", s["ckpt"], "--out", out],
    lambda s, out: ["data", "synth", "--out", out],
    lambda s, out: ["demo", "--out", out],
    lambda s, out: ["report", s["dir"], "--out", out],
], ids=["extract", "eval", "export", "index-build", "explain", "robustness", "data-synth", "demo", "report"])
def test_every_writing_command_checks_its_output_first(small, command):
    code, _, err = run_cli(command(small, small["file"] / "sub"))
    assert_one_line_error(code, err, "--out", "is a file, not a folder")


def test_check_output_path_cases(tmp_path):
    from attnreid.cli._util import check_output_path

    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    assert check_output_path(tmp_path / "new" / "deeper" / "x.npz") == tmp_path / "new" / "deeper" / "x.npz"
    assert not (tmp_path / "new").exists(), "a check creates nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]
    with pytest.raises(AttnReidError, match="is a folder; expected a file"):
        check_output_path(tmp_path / "d")
    with pytest.raises(AttnReidError, match="is a file; expected a folder"):
        check_output_path(tmp_path / "f", "dir")
    with pytest.raises(AttnReidError, match="must end in .npz"):
        check_output_path(tmp_path / "x.txt", suffix=".npz")
    check_output_path(tmp_path / "d", "dir")
    if os.geteuid() != 0:  # root may write in a mode-0500 folder
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(AttnReidError, match="cannot be written"):
            check_output_path(locked / "x.npz")


# --- 4. --opset is honoured or refused ----------------------------------------------------


def test_export_writes_the_requested_opset(small, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m13.onnx"
    code, stdout, err = run_cli(["export", small["ckpt"], "--out", out, "--opset", "13", "--json"])
    assert code == 0, err
    report = json.loads(stdout)
    declared = [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")]
    assert declared == [13] and report["opset"] == 13 and report["exporter"] == "torchscript"


@pytest.mark.parametrize("opset", ["5", "30"])
def test_export_refuses_an_opset_no_exporter_writes(small, tmp_path, opset):
    code, _, err = run_cli(["export", small["ckpt"], "--out", tmp_path / "m.onnx", "--opset", opset])
    assert_one_line_error(code, err, f"--opset {opset} is not supported", "7 to 23")
    assert not (tmp_path / "m.onnx").exists()


def test_exporters_per_opset():
    from attnreid.inference.export import _exporters

    # The dynamo exporter writes opset 18 whatever it is asked below 18: never ask it for those.
    assert [n for n, _ in _exporters(13)] == ["torchscript"]
    assert [n for n, _ in _exporters(18)] == ["dynamo", "torchscript"]
    assert [n for n, _ in _exporters(23)] == ["dynamo"]


# --- 5. skipped images are counted right --------------------------------------------------


def test_unreadable_query_is_counted_apart(small, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(small["root"] / "market1501", root / "market1501")
    queries = sorted((root / "market1501" / "query").glob("*.jpg"))
    queries[0].write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    out = tmp_path / "ev"
    code, stdout, err = run_cli(["eval", small["cfg"], f"data.root={root}", "data.skip_bad_images=true",
                                 "--checkpoint", small["ckpt"], "--out", out, "--json"])
    assert code == 0, err
    assert queries[0].name in err and "Traceback" not in err
    m = json.loads(stdout)
    assert m["num_query"] == len(queries) - 1 and m["num_unreadable_query"] == 1
    assert m["num_unreadable_gallery"] == 0
    assert m["num_valid_queries"] + m["num_skipped_queries"] == m["num_query"]
    with np.load(out / "eval_ranks.npz") as z:
        paths = [str(p) for p in z["query_paths"]]
        assert len(paths) == m["num_query"] == len(z["topk_index"]) and str(queries[0]) not in paths
    code, stdout, err = run_cli(["eval", small["cfg"], f"data.root={root}", "data.skip_bad_images=true",
                                 "--checkpoint", small["ckpt"]])
    assert code == 0, err
    assert f"[{len(queries) - 1} queries" in stdout and "1 unreadable image(s) skipped" in stdout


# --- 7 and 8. command-line overrides ------------------------------------------------------


def test_wrong_type_in_an_override_names_the_override(small):
    code, _, err = run_cli(["model-info", small["cfg"], "model.mhsanet.num_heads=four"])
    assert_one_line_error(code, err, "override 'model.mhsanet.num_heads=four'")
    assert "tiny.yaml" not in err
    with pytest.raises(ConfigError, match="in .*bad.yaml"):  # an error in the file still names the file
        bad = small["dir"] / "bad.yaml"
        bad.write_text("model:\n  mhsanet:\n    num_heads: four\n")
        load_config(bad)


@pytest.mark.parametrize("override, key, expected", [
    ("train.amp=off", "train.amp", "off"),
    ("data.root=no", "data.root", "no"),
    ("data.root=0123", "data.root", "0123"),
    ("data.root=1e3", "data.root", "1e3"),
    ('data.root="quoted dir"', "data.root", "quoted dir"),
    ("model.backbone.weights=null", "model.backbone.weights", None),
    ("train.channels_last=no", "train.channels_last", False),
    ("train.channels_last=true", "train.channels_last", True),
    ("model.mhsanet.num_heads=6", "model.mhsanet.num_heads", 6),
    ("optim.lr=3e-4", "optim.lr", 3e-4),
    ("eval.datasets=[no, market1501]", "eval.datasets", ["no", "market1501"]),
    ("data.workers=auto", "data.workers", "auto"),
    ("data.workers=3", "data.workers", 3),
])
def test_override_values_keep_their_type(override, key, expected):
    cfg = load_config(None, [override])
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


def test_yaml_file_reads_off_as_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  amp: off\n  channels_last: yes\n")
    cfg = load_config(path)
    assert cfg.train.amp == "off" and cfg.train.channels_last is True


def test_parse_override_value_unknown_key_is_yaml():
    assert parse_override_value("no.such.key", "[1, 2]") == [1, 2]


# --- 9. messages name the file, never an object repr -------------------------------------


def test_not_an_image_names_the_file(small, tmp_path):
    from attnreid.data.io import read_image

    fake = tmp_path / "notes.jpg"
    fake.write_text("this is text, not a picture\n")
    with pytest.raises(DataError) as info:
        read_image(str(fake))
    assert str(fake) in str(info.value) and "object at 0x" not in str(info.value)
    code, _, err = run_cli(["explain", small["cfg"], fake, "--checkpoint", small["ckpt"], "--out", tmp_path / "x"])
    assert_one_line_error(code, err, "notes.jpg")
    assert "object at 0x" not in err


# --- 10. progress -------------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_lines_when_piped():
    from attnreid.progress import ProgressReporter

    clock, stream = _Clock(), io.StringIO()
    bar = ProgressReporter("gallery features", total=1000, stream=stream, clock=clock)
    for _ in range(10):  # 10 items a second: the first lines wait for min_seconds (5 s)
        clock.t += 1.0
        bar.advance(10)
    lines = stream.getvalue().splitlines()
    # A line every 100 items (10 %) once 5 s have passed: at 100 items (t = 10 s).
    assert lines == ["gallery features: 100/1000 images (10%), 10.0 images/s, ETA 1m30s"]
    clock.t += 31.0  # nothing done for 31 s: a line anyway
    bar.advance(1)
    assert len(stream.getvalue().splitlines()) == 2
    bar.close()
    assert stream.getvalue().splitlines()[-1] == "gallery features: done, 101 images in 41s"


def test_progress_is_silent_for_short_steps_and_when_disabled():
    from attnreid.progress import ProgressReporter

    clock, stream = _Clock(), io.StringIO()
    with ProgressReporter("query features", total=50, stream=stream, clock=clock) as bar:
        clock.t += 2.0
        bar.advance(50)
    with ProgressReporter("x", total=50, stream=stream, clock=clock, enabled=False) as bar:
        clock.t += 100.0
        bar.advance(50)
    assert stream.getvalue() == ""


def test_progress_open_ended_step_reports_its_end():
    from attnreid.progress import ProgressReporter, format_duration

    clock, stream = _Clock(), io.StringIO()
    with ProgressReporter("re-ranking 3368 x 15913", stream=stream, clock=clock):
        clock.t += 125.0
    assert stream.getvalue() == "re-ranking 3368 x 15913: done, in 2m05s\n"
    assert [format_duration(s) for s in (4.4, 65, 7300)] == ["4s", "1m05s", "2h01m"]


def test_progress_on_a_terminal_uses_a_bar():
    from attnreid.progress import ProgressReporter

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    with ProgressReporter("indexing", total=20, stream=stream) as bar:
        bar.advance(20)
    assert bar.lines == 0  # no plain lines: the bar drew itself (and went away)


def test_eval_shows_progress_on_stderr_and_keeps_stdout_clean(small, monkeypatch):
    import attnreid.progress as progress

    monkeypatch.setattr(progress, "MIN_SECONDS", 0.0)
    code, stdout, err = run_cli(["eval", small["cfg"], "data.test_batch_size=4", "--checkpoint", small["ckpt"],
                                 "--json"])
    assert code == 0, err
    json.loads(stdout)
    assert "market1501 gallery features: " in err and "ETA" in err and "done" in err


# --- 11. CLI conventions ------------------------------------------------------------------

COMMANDS = [[], ["data"], ["data", "stats"], ["data", "synth"], ["train"], ["eval"], ["extract"], ["metrics"],
            ["demo"], ["report"], ["explain"], ["robustness"], ["model-info"], ["export"], ["index"],
            ["index", "build"], ["search"], ["doctor"], ["version"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "attnreid")
def test_help_reads_cleanly_at_80_columns(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(command + ["--help"])
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) > 3
    for line in lines:
        assert len(line) <= 80, line
        assert "`" not in line, line  # no RST literals
        assert "<bool>" not in line, line  # flags are flags
        assert "…" not in line, line  # nothing cut off


def test_help_groups_commands_in_order(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    _, out, _ = run_cli(["--help"])
    panels = [p for p in ("Data", "Train and evaluate", "Analysis", "Deploy") if f"─ {p} " in out]
    assert panels == ["Data", "Train and evaluate", "Analysis", "Deploy"]
    assert out.index("─ Data ") < out.index(" data ") < out.index("─ Train and evaluate ") < out.index(" train ")
    from attnreid.cli import PANELS, app

    listed = {n for _, names in PANELS for n in names}
    assert {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands} <= listed
    assert {g.name for g in app.registered_groups} <= listed


def test_version_option():
    from attnreid import __version__

    code, out, _ = run_cli(["--version"])
    assert code == 0 and out.strip() == f"attnreid {__version__}"


def test_option_spellings_and_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    helps = {" ".join(c): run_cli(c + ["--help"])[1] for c in (["report"], ["search"], ["eval"], ["metrics"],
                                                               ["index", "build"], ["explain"])}
    assert "--top-k" in helps["report"] and "--topk" not in helps["report"]
    assert "--top-k" in helps["search"]
    for name in ("eval", "metrics"):
        assert "--no-rerank" in helps[name]
    for name in ("search", "index build", "explain"):
        assert "[default: auto]" in helps[name].split("--device", 1)[1].splitlines()[0]


def test_bad_device_option_is_one_line(small, tmp_path):
    code, _, err = run_cli(["index", "build", small["root"], "--checkpoint", small["ckpt"], "--out", tmp_path / "i",
                            "--device", "tpu"])
    assert_one_line_error(code, err, "--device is 'tpu'", "auto, cpu, cuda or cuda:N")


# --- 12. data.workers: auto ---------------------------------------------------------------


def test_workers_auto_is_sized_to_the_machine(monkeypatch):
    assert [resolve_workers("auto", cpus=n) for n in (1, 2, 3, 8, 64)] == [0, 1, 2, 4, 4]
    assert resolve_workers(3) == 3
    for bad in (-1, "four", 1.5, True):
        with pytest.raises(ConfigError, match="data.workers"):
            resolve_workers(bad)
    assert load_config().data.workers == "auto"
    base = yaml.safe_load((Path(__file__).parents[1] / "configs" / "base.yaml").read_text())
    assert base["data"]["workers"] == "auto"
    with pytest.raises(ConfigError, match="'data.workers' is 'four'"):
        load_config(None, ["data.workers=four"])


@pytest.mark.parametrize("cpus", [1, 2])
def test_auto_workers_give_no_torch_warning(monkeypatch, cpus):
    import warnings

    from attnreid.data.loader import build_test_loader

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    cfg = load_config(None, ["data.height=32", "data.width=16"])
    loader = build_test_loader(cfg.data, [("x.jpg", 1, 0)])
    assert loader.num_workers == max(0, cpus - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.check_worker_number_rationality()


# --- 15. report polish --------------------------------------------------------------------


def _ranks(q_pids, first_hits, first_match_rank=None, k=5):
    """An eval_ranks dict: query i's first true match at top-k rank first_hits[i] (0: none in the top k)."""
    q = len(q_pids)
    g_pids, index = [], []
    for i, (pid, hit) in enumerate(zip(q_pids, first_hits)):
        row = []
        for r in range(1, k + 1):
            row.append(len(g_pids))
            g_pids.append(pid if r == hit else 1000 + len(g_pids))
        g_pids.append(pid)  # every query has a true match somewhere
        index.append(row)
    ranks = {"query_paths": np.array([f"q{i}.jpg" for i in range(q)]),
             "gallery_paths": np.array([f"g{i}.jpg" for i in range(len(g_pids))]),
             "query_pids": np.array(q_pids), "gallery_pids": np.array(g_pids),
             "query_camids": np.zeros(q, np.int64), "gallery_camids": np.ones(len(g_pids), np.int64),
             "topk_index": np.array(index), "topk_dist": np.tile(np.arange(k, dtype=np.float32), (q, 1))}
    if first_match_rank is not None:
        ranks["first_match_rank"] = np.array(first_match_rank)
    return ranks


def test_worst_queries_break_ties_by_first_match_and_differ_in_identity():
    from attnreid.viz.ranking import select_queries

    # Queries 0-2 (identity 7) and 3 (identity 8) have no match in the top 5 (AP@k 0): tied
    # without the full ranking; query 4 is bad but has a hit at rank 4.
    ranks = _ranks([7, 7, 7, 8, 9], [0, 0, 0, 0, 4], first_match_rank=[60, 900, 300, 80, 4])
    assert select_queries(ranks, 3) == [1, 3, 4]  # worst of identity 7, then identity 8, then the hit at rank 4
    assert select_queries(ranks, 5) == [1, 3, 4, 2, 0]  # repeats of an identity only after all identities
    assert select_queries(ranks, 3, by="first_hit") == [1, 3, 4]
    without = _ranks([7, 7, 7, 8, 9], [0, 0, 0, 0, 4])
    assert set(select_queries(without, 2)) <= {0, 1, 2, 3} and len({7, 8}) == 2


def test_first_match_ranks_follow_the_protocol():
    from attnreid.evaluation.rank import evaluate_rank

    def first_match_ranks(dist, q_pids, g_pids, q_cams, g_cams, protocol):  # the evaluation pass's ranked lists
        cams = (None, None) if protocol == "partial" else (q_cams, g_cams)
        return evaluate_rank(dist, q_pids, g_pids, *cams, ranked_k=2)["ranked"]["first_match_rank"]

    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4],
                         [0.4, 0.3, 0.2, 0.1]])
    q_pids, g_pids = np.array([1, 2]), np.array([1, 5, 1, 6])
    q_cams, g_cams = np.array([0, 0]), np.array([0, 1, 1, 1])
    # Query 0: gallery 0 is its own camera (junk), gallery 2 the first true match, after gallery 1.
    assert first_match_ranks(dist, q_pids, g_pids, q_cams, g_cams, "market").tolist() == [2, 0]
    assert first_match_ranks(dist, q_pids, g_pids, q_cams, g_cams, "partial").tolist() == [1, 0]


def _log_lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def test_training_curve_leaves_out_the_unfinished_epoch_and_report_shows_epochs_trained(tmp_path, monkeypatch):
    import matplotlib.figure

    from attnreid.viz.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "baseline"}, "train": {"epochs": 400},
                                                     "data": {"dataset": "market1501"}}))
    (run / "log.jsonl").write_text(_log_lines(
        {"type": "train", "epoch": 1, "step": 4, "loss": 5.0},
        {"type": "train", "epoch": 1, "step": 8, "loss": 4.0},
        {"type": "train", "epoch": 2, "step": 12, "loss": 3.0},
        {"type": "train", "epoch": 2, "step": 16, "loss": 2.0},
        {"type": "train", "epoch": 3, "step": 18, "loss": 9.0},  # stopped here by Ctrl-C
        {"type": "interrupted", "epoch": 2, "step": 18}))
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    page = write_report([run], tmp_path / "rep").read_text()
    assert "2 of 400" in page
    (fig,) = figures
    ax = fig.axes[0]
    xs = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
    assert xs == [1, 2]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_one_epoch_curve_has_whole_number_ticks(tmp_path, monkeypatch):
    import matplotlib.figure

    from attnreid.viz.plots import plot_training, training_series

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figures.append(self))
    records = [{"type": "train", "epoch": 1, "step": 3, "loss": 2.0}, {"type": "eval", "epoch": 1, "mAP": 0.1,
                                                                         "rank1": 0.2}]
    plot_training(records, tmp_path / "t.png")
    for ax in figures[0].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # A last epoch with fewer steps than the ones before is still running: left out.
    running = [{"type": "train", "epoch": e, "step": s, "loss": 1.0} for e, s in ((1, 10), (2, 20), (3, 24))]
    assert training_series(running)["loss_epochs"] == [1, 2]
    assert training_series(running[:2])["loss_epochs"] == [1, 2]


# --- 16. several test sets in one run -----------------------------------------------------


def test_eval_on_several_test_sets(small, tmp_path):
    out = tmp_path / "ev"
    code, stdout, err = run_cli(["eval", small["cfg"], "eval.datasets=[market1501, dukemtmcreid]",
                                 "--checkpoint", small["ckpt"], "--out", out, "--json"])
    assert code == 0, err
    m = json.loads(stdout)
    assert m["dataset"] == "market1501"
    assert [d["dataset"] for d in m["datasets"]] == ["market1501", "dukemtmcreid"]
    # The same images under two names: the same numbers, each set evaluated on its own.
    a, b = m["datasets"]
    assert a["rank1"] == pytest.approx(b["rank1"]) and a["mAP"] == pytest.approx(b["mAP"])
    for name in ("market1501", "dukemtmcreid"):
        sub = json.loads((out / "datasets" / name / "eval.json").read_text())
        assert sub["dataset"] == name and (out / "datasets" / name / "eval_ranks.npz").is_file()
    top = json.loads((out / "eval.json").read_text())
    assert top["dataset"] == "market1501" and len(top["datasets"]) == 2 and (out / "eval_ranks.npz").is_file()
    code, stdout, err = run_cli(["eval", small["cfg"], "eval.datasets=[market1501, dukemtmcreid]",
                                 "--checkpoint", small["ckpt"]])
    assert code == 0, err
    table = stdout.splitlines()
    assert table[0].endswith("on 2 test sets:")
    assert table[1].split() == ["dataset", "protocol", "R1", "R3", "R5", "R10", "mAP", "queries", "gallery"]
    for line, d in zip(table[2:4], m["datasets"]):
        cells = line.split()
        assert cells[:2] == [d["dataset"], "market"] and float(cells[2]) == pytest.approx(100 * d["rank1"], abs=0.05)
        assert cells[-2:] == [str(d["num_query"]), str(d["num_gallery"])]


def test_eval_datasets_errors(small):
    code, _, err = run_cli(["eval", small["cfg"], "eval.datasets=[market1501, market1501]",
                            "--checkpoint", small["ckpt"]])
    assert_one_line_error(code, err, "eval.datasets names a data set twice")
    code, _, err = run_cli(["eval", small["cfg"], "eval.datasets=[market1501, msmt17]", "--checkpoint", small["ckpt"]])
    assert_one_line_error(code, err, "MSMT17")


def test_data_check_shows_progress(small, monkeypatch):
    import attnreid.progress as progress

    monkeypatch.setattr(progress, "MIN_SECONDS", 0.0)
    code, out, err = run_cli(["data", "stats", "market1501", "--root", small["root"], "--check-images", "--json"])
    assert code == 0, err
    json.loads(out)
    assert "checking market1501 images: " in err and "ETA" in err


def test_trainer_records_mark_complete_epochs():
    from attnreid.viz.plots import training_series

    # The trainer's own records: "run" at the start, "diagnostics" after each epoch, a
    # budget stop inside epoch 3 followed by the final "eval" of the 2 complete epochs.
    log = [{"type": "run", "epoch": 0, "step": 0},
           {"type": "train", "epoch": 1, "step": 10, "loss": 3.0}, {"type": "diagnostics", "epoch": 1, "step": 10},
           {"type": "train", "epoch": 2, "step": 20, "loss": 2.0}, {"type": "diagnostics", "epoch": 2, "step": 20},
           {"type": "train", "epoch": 3, "step": 29, "loss": 7.0},
           {"type": "eval", "epoch": 2, "step": 29, "mAP": 0.1, "rank1": 0.2}]
    s = training_series(log)
    assert s["loss_epochs"] == [1, 2] and s["epochs_trained"] == 2 and s["loss"]["loss"] == [3.0, 2.0]


def test_training_evaluates_every_set_of_eval_datasets_at_the_end(small, tmp_path):
    """eval.datasets at the end of a training run: one table in eval.json, each set's files."""
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", small["cfg"], "--out", out, "train.epochs=1", "train.max_steps_per_epoch=1",
                                 "eval.datasets=[market1501, dukemtmcreid]"])
    assert code == 0, err
    top = json.loads((out / "eval.json").read_text())
    assert top["dataset"] == "market1501" and [d["dataset"] for d in top["datasets"]] == ["market1501", "dukemtmcreid"]
    assert (out / "datasets" / "dukemtmcreid" / "eval.json").is_file()
    assert "also dukemtmcreid" in stdout
