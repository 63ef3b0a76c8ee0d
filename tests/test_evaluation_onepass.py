"""Evaluation in one pass: each (re-ranked) distance computed once, streamed blocks equal to the
whole matrix, the Q x G file written atomically, and the torch-free path equal to the torch path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from helpers import assert_one_line_error, run_cli

from attnreid.errors import AttnReidError
from attnreid.evaluation import distance, rerank
from attnreid.evaluation.distance import compute_distance
from attnreid.evaluation.options import RankingOptions
from attnreid.evaluation.protocols import evaluate, save_rows
from attnreid.evaluation.rank import _draw_keys, evaluate_cuhk03_single_shot, evaluate_rank
from attnreid.evaluation.rerank import iter_re_ranking, re_ranking


def problem(seed=0, q=14, g=45, ids=6, dim=8, integer=False):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim)) * 2
    qp, gp = rng.integers(0, ids, q), rng.integers(0, ids, g)
    qf = centres[qp] + rng.standard_normal((q, dim))
    gf = centres[gp] + rng.standard_normal((g, dim))
    if integer:  # integer-valued features: every product and sum of the distances is exact
        qf, gf = np.round(qf * 2), np.round(gf * 2)
    return (qf.astype(np.float32), gf.astype(np.float32), qp, gp, rng.integers(0, 3, q), rng.integers(0, 3, g))


def assert_same(a, b):
    """Two results of the evaluation, equal to the last bit (arrays included)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same(a[key], b[key])
        elif isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key], equal_nan=True), key
        else:
            assert a[key] == b[key], key


class Counter:
    """Wraps a function and counts the query rows it computes (first argument's rows, or ``rows``)."""

    def __init__(self, fn, rows):
        self.fn, self.rows, self.calls, self.total = fn, rows, 0, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.total += self.rows(*args, **kwargs)
        return self.fn(*args, **kwargs)


def count_computations(monkeypatch):
    """Counters of the distance rows, the neighbour passes and the re-ranked rows computed."""
    plain = Counter(distance.distance_block, lambda q, *a, **k: q.shape[0])
    neighbours = Counter(rerank._neighbours, lambda *a, **k: 1)
    reranked = Counter(rerank._sq_distances, lambda feats, sq, rows, cols: rows.stop - rows.start)
    monkeypatch.setattr(distance, "distance_block", plain)
    monkeypatch.setattr(rerank, "_neighbours", neighbours)
    monkeypatch.setattr(rerank, "_sq_distances", reranked)
    return plain, neighbours, reranked


@pytest.mark.parametrize("rerank_on", [False, True])
@pytest.mark.parametrize("protocol", ["market", "cuhk03_classic"])
def test_one_pass_computes_each_distance_once(monkeypatch, rerank_on, protocol):
    qf, gf, qp, gp, qc, gc = problem(1)
    plain, neighbours, reranked = count_computations(monkeypatch)
    res = evaluate(qf, gf, qp, gp, qc, gc, protocol=protocol, ranking=RankingOptions(rerank=rerank_on, k1=5, k2=2),
                   per_query=True, ranked_k=4, chunk_size=4)
    # every query row's distances (or re-ranked distances) computed exactly once
    if rerank_on:
        assert (plain.total, neighbours.calls, reranked.total) == (0, 1, len(qf))
    else:
        assert (plain.total, neighbours.calls, reranked.total) == (len(qf), 0, 0)
    assert res["ranked"]["topk_index"].shape == (len(qf), 4) and "per_query" in res


@pytest.mark.parametrize("rerank_on", [False, True])
def test_engine_evaluation_computes_each_distance_once(monkeypatch, tmp_path, synthetic_root, rerank_on):
    from attnreid.config import load_config
    from attnreid.data.datasets import build_dataset
    from attnreid.engine.evaluator import evaluate_model

    class MeanColour(nn.Module):
        feature_dim = 3

        def forward(self, x):
            return x.mean((2, 3))

    cfg = load_config(None, ["data.dataset=market1501", f"data.root={synthetic_root}", "data.height=32",
                             "data.width=16", "data.workers=0", "eval.bootstrap=10", "eval.k1=4", "eval.k2=2"])
    ds = build_dataset("market1501", synthetic_root)
    plain, neighbours, reranked = count_computations(monkeypatch)
    metrics = evaluate_model(MeanColour(), ds, cfg, out_dir=tmp_path / "run", rerank=rerank_on, save_distmat=True)
    rows = plain.total if not rerank_on else reranked.total
    assert rows == len(ds.query) and neighbours.calls == int(rerank_on) and metrics["rerank"] is rerank_on
    ranks = np.load(tmp_path / "run" / "eval_ranks.npz")
    per_query = np.load(tmp_path / "run" / "eval_per_query.npz")
    # the ranked lists and first-match ranks come from the distances the metrics were computed on
    dist = np.load(tmp_path / "run" / "distmat.npy")
    assert dist.shape == (len(ds.query), len(ds.gallery))
    assert np.array_equal(np.take_along_axis(dist, ranks["topk_index"], 1), ranks["topk_dist"])
    assert np.array_equal(ranks["first_match_rank"], per_query["first_rank"])


def test_streamed_rerank_equals_the_whole_matrix():
    qf, gf, qp, gp, qc, gc = problem(2, q=23, g=70)
    options = RankingOptions(rerank=True, k1=6, k2=3, lambda_value=0.2)
    whole = re_ranking(qf, gf, k1=6, k2=3, lambda_value=0.2)
    blocks = list(iter_re_ranking(qf, gf, options))
    assert np.array_equal(np.concatenate([b for _, b in blocks]), whole)
    for protocol in ("market", "cuhk03_classic", "partial"):
        cams = (None, None) if protocol == "partial" else (qc, gc)
        streamed = evaluate(qf, gf, qp, gp, *cams, protocol=protocol, ranking=options, per_query=True, ranked_k=5)
        fn = evaluate_cuhk03_single_shot if protocol == "cuhk03_classic" else evaluate_rank
        direct = fn(whole, qp, gp, *cams, per_query=True, ranked_k=5)
        assert_same({k: streamed[k] for k in direct}, direct)
    # a block size of a few rows: the blocks the evaluator consumes are those of the whole matrix
    small = np.concatenate([b for _, b in iter_re_ranking(qf, gf, options, rows=4)])
    res = evaluate(qf, gf, qp, gp, qc, gc, ranking=options, per_query=True, ranked_k=3, chunk_size=4)
    assert_same({k: res[k] for k in ("mAP", "per_query", "ranked")},
                {k: v for k, v in evaluate_rank(small, qp, gp, qc, gc, per_query=True, ranked_k=3).items()
                 if k in ("mAP", "per_query", "ranked")})


def test_save_distmat_writes_the_matrix_atomically(tmp_path):
    qf, gf, qp, gp, qc, gc = problem(3)
    out = tmp_path / "d.npy"
    options = RankingOptions(rerank=True, k1=5, k2=2)
    evaluate(qf, gf, qp, gp, qc, gc, ranking=options, save_distmat=out, chunk_size=5)
    assert np.array_equal(np.load(out), np.concatenate([b for _, b in iter_re_ranking(qf, gf, options, rows=5)]))
    evaluate(qf, gf, qp, gp, qc, gc, save_distmat=out)
    assert np.array_equal(np.load(out), compute_distance(qf, gf, chunk_size=len(qf)))

    # A pass that stops half-way leaves the old file as it was and no temporary file.
    before = out.read_bytes()

    def failing():
        yield 0, np.zeros((2, len(gf)), np.float32)
        raise AttnReidError("stopped")

    with pytest.raises(AttnReidError, match="stopped"):
        for _ in save_rows(failing(), out, (len(qf), len(gf))):
            pass
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["d.npy"]


def test_numpy_path_equals_torch_path_bit_for_bit():
    # Integer-valued features (cosine: rows of four +-1 entries, norm 2): every distance is exact in
    # both libraries, so the numpy path (attnreid metrics) and the torch path (the engine) must agree
    # to the last bit in every number they return.
    qf, gf, qp, gp, qc, gc = problem(4, q=30, g=90, dim=12, integer=True)
    rng = np.random.default_rng(5)
    unit = np.zeros((120, 12), np.float32)
    for row in unit:
        row[rng.choice(12, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    for metric, (q, g) in (("euclidean_sq", (qf, gf)), ("cosine", (unit[:30], unit[30:]))):
        assert np.array_equal(compute_distance(q, g, metric), compute_distance(torch.from_numpy(q), g, metric).numpy())
        for protocol in ("market", "cuhk03_classic", "partial"):
            kw = dict(protocol=protocol, ranking=RankingOptions(metric=metric), per_query=True, ranked_k=7, chunk_size=8)
            a = evaluate(q, g, qp, gp, qc, gc, **kw)
            b = evaluate(torch.from_numpy(q), torch.from_numpy(g), torch.from_numpy(qp), gp, qc, gc, **kw)
            assert_same(a, b)


@pytest.mark.parametrize("seed", [0, 7, 2**31 + 3])
def test_cuhk03_draws_are_torch_generator_draws(seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rng = np.random.RandomState(seed & 0xFFFFFFFF)
    for shape in ((3, 17), (1, 5), (4, 9)):
        assert np.array_equal(_draw_keys(rng, shape), torch.randint(0, 1 << 40, shape, generator=gen).numpy())


def test_ranking_options_are_checked_once():
    with pytest.raises(AttnReidError, match="unknown distance metric 'l1'"):
        RankingOptions(metric="l1")
    with pytest.raises(AttnReidError, match="rerank_input|re-ranking input"):
        RankingOptions(rerank_input="fourth_power")
    with pytest.raises(AttnReidError, match="k1 >= 1"):
        RankingOptions(k1=0)
    with pytest.raises(AttnReidError, match="lambda"):
        RankingOptions(lambda_value=1.5)
    from attnreid.config import load_config

    cfg = load_config(None, ["eval.metric=cosine", "eval.k1=9", "eval.rerank_input=torchreid"])
    assert RankingOptions.from_config(cfg.eval, rerank=True) == RankingOptions("cosine", True, 9, cfg.eval.k2,
                                                                               cfg.eval.lambda_value, "torchreid")
    assert RankingOptions.from_config(cfg.eval).rerank is cfg.eval.rerank


def test_first_match_rank_is_the_metrics_rank_with_ties():
    # Tied distances are ordered by gallery index, as the metrics order them; pid -1 is junk.
    dist = np.array([[0.5, 0.5, 0.5, 0.1]], np.float32)
    res = evaluate_rank(dist, [3], [-1, 7, 3, 7], [0], [1, 1, 1, 1], ranked_k=4, per_query=True)
    assert res["ranked"]["first_match_rank"].tolist() == [3] == res["per_query"]["first_rank"].tolist()
    assert res["ranked"]["topk_index"].tolist() == [[3, 0, 1, 2]]


# --- torch-free: attnreid metrics and --version -------------------------------------------------

_RUN = textwrap.dedent("""
    import json, sys
    from attnreid.cli import main
    try:
        main(json.loads(sys.argv[1]))
    except SystemExit as exc:
        code = exc.code
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "torch")), file=sys.stderr)
""")


def _torch_modules_after(args):
    proc = subprocess.run([sys.executable, "-c", _RUN, json.dumps([str(a) for a in args])],
                          capture_output=True, text=True, timeout=300)
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc


def test_metrics_and_version_never_import_torch(tmp_path):
    qf, gf, qp, gp, qc, gc = problem(6)
    ids = dict(query_pids=qp, gallery_pids=gp, query_camids=qc, gallery_camids=gc)
    np.savez(tmp_path / "f.npz", query_features=qf, gallery_features=gf, **ids)
    np.savez(tmp_path / "d.npz", distmat=compute_distance(qf, gf), **ids)
    for args in (["--version"], ["version"], ["metrics", tmp_path / "f.npz", "--json"],
                 ["metrics", tmp_path / "d.npz", "--protocol", "cuhk03_classic", "--save-distmat", tmp_path / "o.npy"],
                 ["metrics", "--help"], ["compare", tmp_path / "f.npz", tmp_path / "d.npz", "--json"]):
        loaded, proc = _torch_modules_after(args)
        assert proc.returncode == 0, proc.stderr
        assert loaded == [], f"attnreid {' '.join(map(str, args))} imported {loaded[:3]}"
    assert np.array_equal(np.load(tmp_path / "o.npy"), compute_distance(qf, gf))
    # re-ranking is written in torch: the one metrics option that loads it
    loaded, proc = _torch_modules_after(["metrics", tmp_path / "f.npz", "--rerank", "--json"])
    assert proc.returncode == 0 and "torch" in loaded


def test_metrics_json_equals_the_library_and_checks_save_distmat(tmp_path):
    qf, gf, qp, gp, qc, gc = problem(7)
    np.savez(tmp_path / "f.npz", query_features=qf, gallery_features=gf, query_pids=qp, gallery_pids=gp,
             query_camids=qc, gallery_camids=gc)
    code, out, err = run_cli(["metrics", tmp_path / "f.npz", "--metric", "cosine", "--bootstrap", "0", "--json"])
    assert code == 0, err
    expected = evaluate(qf, gf, qp, gp, qc, gc, ranking=RankingOptions(metric="cosine"))
    assert {k: v for k, v in json.loads(out).items()} == {k: expected[k] for k in json.loads(out)}
    code, _, err = run_cli(["metrics", tmp_path / "f.npz", "--save-distmat", tmp_path / "x.txt"])
    assert_one_line_error(code, err, "--save-distmat", ".npy")
    code, _, err = run_cli(["metrics", tmp_path / "f.npz", "--metric", "l1"])
    assert_one_line_error(code, err, "--metric", "l1")


def test_every_command_module_is_named_once():
    # Each command's module, loaded alone, registers that command: what the lazy loading relies on.
    from attnreid import cli

    script = textwrap.dedent("""
        import importlib, json, sys
        from attnreid import cli
        importlib.import_module("attnreid.cli." + sys.argv[1])
        names = [c.name or c.callback.__name__.replace("_", "-") for c in cli.app.registered_commands]
        print(json.dumps(names + [g.name for g in cli.app.registered_groups]))
    """)
    for module in sorted(set(cli.COMMANDS.values())):
        out = subprocess.run([sys.executable, "-c", script, module], capture_output=True, text=True, check=True).stdout
        named = {n for n, m in cli.COMMANDS.items() if m == module}
        assert named <= set(json.loads(out)), module
    assert set(cli.COMMANDS) | {"version"} == {n for _, names in cli.PANELS for n in names}


def test_eval_command_reads_the_checkpoint_once(monkeypatch, tmp_path, synthetic_root):
    from attnreid.config import load_config, save_config, to_dict
    from attnreid.engine.checkpoint import save_checkpoint
    from attnreid.models import build_model

    cfg = load_config(None, ["data.dataset=market1501", f"data.root={synthetic_root}", "data.height=64",
                             "data.width=32", "data.workers=0", "model.name=baseline",
                             "model.backbone.name=mobilenetv3_small", "train.device=cpu", "eval.bootstrap=10",
                             "eval.backend=torch"])
    save_config(cfg, tmp_path / "c.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model, 4)
    ckpt = save_checkpoint(tmp_path / "c.pth", {"model": model.state_dict(), "config": to_dict(cfg),
                                                "num_classes": 4, "epoch": 7, "step": 3, "metrics": {}})
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    code, out, err = run_cli(["eval", tmp_path / "c.yaml", "--checkpoint", ckpt, "--json"])
    assert code == 0, err
    assert reads.count(str(ckpt)) == 1 and json.loads(out)["epoch"] == 7
