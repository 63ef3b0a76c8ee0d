"""`attnreid train`, `eval`, `extract` and `demo`: thin shells over :mod:`attnreid.engine`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import print_json
from attnreid.errors import AttnReidError

SPLITS = ("query", "gallery", "train")


def default_run_dir(config: Path) -> Path:
    """``runs/<family>_<row>`` for ``configs/<family>/<row>.yaml``, else ``runs/<row>``."""
    parent = config.resolve().parent.name
    stem = config.stem
    return Path("runs") / (f"{parent}_{stem}" if parent and parent != "configs" else stem)


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Argument(
        None, help="YAML config (e.g. configs/mhsanet/occluded_duke_star.yaml); optional with --resume."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. train.epochs=10."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<family>_<row>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pth, "
                                                          "with the run's own config.yaml (+ any KEY=VALUE)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out."),
) -> None:
    """Train a model: writes config.yaml, log.jsonl, checkpoints/last.pth (+ best.pth with data.val_ids) and eval.json."""
    from attnreid.config import load_config
    from attnreid.distributed import is_main_process
    from attnreid.engine.trainer import run_config, train

    args = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        args.insert(0, str(config))  # `attnreid train --resume --out RUN train.epochs=600`: no config file
        config = None
    if config is None and not (resume and out is not None):
        raise AttnReidError("attnreid train needs a CONFIG file, or --resume --out RUN to continue a run")
    run_dir = out or default_run_dir(config)
    speak = is_main_process()  # under torchrun only rank 0 prints; every rank exits with the status
    try:
        if resume:
            cfg, ignored = run_config(run_dir, args, config)
            if ignored and speak:
                print(f"note: resuming with {run_dir / 'config.yaml'}; {config} sets {', '.join(ignored[:4])}"
                      f"{' ...' if len(ignored) > 4 else ''} differently and is not applied "
                      f"(pass KEY=VALUE to change a key)", file=sys.stderr)
        else:
            cfg = load_config(config, args)
        result = train(cfg, run_dir, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt:  # while reading the data or building the model: nothing new to save
        last = run_dir / "checkpoints" / "last.pth"
        hint = f"continue with: {resume_command(run_dir)}" if last.is_file() else "nothing was saved"
        if speak:
            print(f"interrupted; {hint}", file=sys.stderr)
        raise typer.Exit(130)
    if result["status"] == "interrupted":
        if speak:
            print(f"interrupted: saved {result['checkpoint']} after {result['epoch']} epochs ({result['step']} steps); "
                  f"continue with: {resume_command(run_dir)}", file=sys.stderr)
        raise typer.Exit(130)
    if speak:
        print(f"{result['status']}: {result['epoch']} epochs, {result['step']} steps in {result['train_seconds']:.0f} s "
              f"({result['img_per_s']:.1f} img/s, {100 * result['data_wait']:.0f}% waiting for data); "
              f"{_metrics_line(result)} (last weights, {result.get('dataset', 'test')} test split); "
              f"run folder {run_dir}")


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir`` (its config.yaml keeps every override)."""
    import shlex

    return f"attnreid train --resume --out {shlex.quote(str(run_dir))}"


def _metrics_line(m: dict) -> str:
    if m.get("protocol") == "partial":
        keys = [("rank1", "R1"), ("rank3", "R3")]
    else:
        keys = [("rank1", "R1"), ("rank5", "R5"), ("rank10", "R10"), ("mAP", "mAP")]
    return "  ".join(f"{label} {100 * m[k]:.1f}%" for k, label in keys if isinstance(m.get(k), (int, float)))


@app.command("eval")
def eval_cmd(
    config: Path = typer.Argument(..., help="YAML config of the model and the evaluation set."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A .pth written by attnreid train."),
    rerank: bool = typer.Option(False, "--rerank", help="k-reciprocal re-ranking (k1, k2, lambda from eval.*)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write eval.json, eval_ranks.npz (and the report) here."),
) -> None:
    """Evaluate a checkpoint with the benchmark's protocol: R1/R5/R10/mAP (R1/R3 for partial sets)."""
    from attnreid.config import load_config
    from attnreid.engine.build import build_eval_dataset, load_model, resolve_device
    from attnreid.engine.checkpoint import load_checkpoint
    from attnreid.engine.evaluator import evaluate_model, write_report_if_available

    cfg = load_config(config, list(overrides or []))
    device = resolve_device(cfg.train.device)
    model, cfg = load_model(checkpoint, cfg, device=device)
    dataset = build_eval_dataset(cfg)
    epoch = load_checkpoint(checkpoint).get("epoch")
    metrics = evaluate_model(model, dataset, cfg, out_dir=out, device=device, rerank=rerank or None,
                             extra={"checkpoint": str(checkpoint), "epoch": epoch})
    report = None
    if out is not None:
        if not as_json:
            print(f"wrote {out / 'eval.json'} and {out / 'eval_ranks.npz'}")
        report = write_report_if_available([out], out / "report")
    if as_json:
        if report is not None:
            metrics["report"] = str(report)
        print_json(metrics)
        return
    rr = " + re-ranking" if metrics["rerank"] else ""
    print(f"{metrics['model']} ({metrics['test_feature']} feature, {metrics['feature_dim']}-d) on "
          f"{metrics['dataset']}{rr}: {_metrics_line(metrics)}  "
          f"[{metrics['num_query']} queries, {metrics['num_gallery']} gallery]")
    if report is not None:
        print(f"report: {report}")


@app.command("extract")
def extract_cmd(
    config: Path = typer.Argument(..., help="YAML config of the model (and data set for --split)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A .pth written by attnreid train."),
    split: Optional[List[str]] = typer.Option(None, "--split", help="query, gallery or train; repeat for several."),
    folder: Optional[Path] = typer.Option(None, "--folder", help="Extract every image under this folder."),
    out: Path = typer.Option(..., "--out", help="Output .npz."),
) -> None:
    """Features to .npz in the `attnreid metrics` format (query_/gallery_features, _pids, _camids).

    A folder gives ``features`` and ``paths``. ``--split query --split gallery`` gives a
    file `attnreid metrics` evaluates directly.
    """
    import numpy as np

    from attnreid.engine.build import build_eval_dataset, load_model, resolve_device
    from attnreid.config import load_config
    from attnreid.engine.extract import extract_features, folder_items

    splits = list(split or [])
    if bool(splits) == (folder is not None):
        raise AttnReidError("give either --split (query, gallery, train) or --folder, not both or neither")
    for s in splits:
        if s not in SPLITS:
            raise AttnReidError(f"--split is {s!r}; expected one of: {', '.join(SPLITS)}")
    if out.suffix != ".npz":
        raise AttnReidError(f"--out {out} must end in .npz")
    cfg = load_config(config, list(overrides or []))
    device = resolve_device(cfg.train.device)
    model, cfg = load_model(checkpoint, cfg, device=device)
    arrays = {}
    if folder is not None:
        items = folder_items(folder)
        feats, _, _ = extract_features(model, items, cfg.data, device=device, flip=cfg.eval.flip)
        arrays = {"features": feats.numpy(), "paths": np.array([p for p, _, _ in items])}
    else:
        if "train" in splits:
            from attnreid.data.datasets import build_dataset_from_config

            train_set = build_dataset_from_config(cfg.data)
        eval_set = build_eval_dataset(cfg) if any(s != "train" for s in splits) else None
        for s in splits:
            items = train_set.train if s == "train" else getattr(eval_set, s)
            feats, pids, camids = extract_features(model, items, cfg.data, device=device, flip=cfg.eval.flip)
            arrays.update({f"{s}_features": feats.numpy(), f"{s}_pids": pids, f"{s}_camids": camids,
                           f"{s}_paths": np.array([p for p, _, _ in items])})
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items() if k.endswith("features"))
    print(f"wrote {out}: {shapes}")


@app.command("demo")
def demo_cmd(
    minutes: float = typer.Option(6.0, "--minutes", help="Total time budget (data, training, evaluation)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the data set, runs and report."),
    models: str = typer.Option("baseline,mhsanet,hacnn", "--models", help="Comma-separated models to train."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
) -> None:
    """Synthetic occluded data set -> train Baseline, MHSA-Net, HA-CNN on the CPU -> compare side by side."""
    from attnreid.engine.demo import run_demo

    result = run_demo(minutes=minutes, out_dir=out, models=[m.strip() for m in models.split(",") if m.strip()],
                      quiet=as_json)
    if as_json:
        print_json(result)
