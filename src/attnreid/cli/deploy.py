"""`attnreid export`, `attnreid index build`, `attnreid search`: deployment commands."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from attnreid.choices import INFERENCE_AMP_CHOICES, INFERENCE_BACKENDS
from attnreid.cli._app import app
from attnreid.cli._util import (CHECKPOINT_HELP, MODEL_HELP, OVERRIDES_HELP, check_output_path, device_option,
                                interrupted, print_json, resolve_model)
from attnreid.errors import AttnReidError

DEFAULT_CAMERA_REGEX = r"_c(\d+)"  # same as attnreid.deploy.index (not imported: keeps --help fast)
AMP_HELP = ("Precision: auto, off, bf16, fp16 or int8 (openvino) (default: the config's eval.amp, auto = bf16 where "
            "native).")
INFER_BACKEND_HELP = ("Inference backend: auto (for big CPU jobs the fastest installed path matching PyTorch "
                      "fp32), torch, onnxruntime or openvino (default: the config's eval.backend).")

index_app = typer.Typer(help="Build a gallery index for 'attnreid search'.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@app.command("export")
def export(
    model: Path = typer.Argument(..., help=MODEL_HELP),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    out: Path = typer.Option(..., "--out", help="ONNX file to write."),
    attention: bool = typer.Option(False, "--attention/--no-attention",
                                   help="Also output the attention maps (extra graph outputs)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset, 7 to 23 (default 18; HA-CNN: >= 16)."),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="Largest accepted relative difference vs PyTorch."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Export a model to ONNX (dynamic batch) and check it against PyTorch in onnxruntime."""
    from attnreid.deploy.extractor import FeatureExtractor  # torch: imported when the command runs, not for --help
    from attnreid.inference.export import CONTRACT_BATCHES, check_opset, export_onnx, inference_contract

    check_opset(opset)
    check_output_path(out, "file")
    source = resolve_model(model, overrides, checkpoint)
    ext = FeatureExtractor(source.cfg, checkpoint=source.checkpoint)
    d = ext.cfg.data
    meta = inference_contract(ext.model_name, ext.feature_dim, ext.input_size, d.mean, d.std,
                              bool(ext.cfg.model.feature_norm), ext.metric, ext.fingerprint, ext.weights_fingerprint)
    report = export_onnx(ext.model, out, ext.input_size, opset=opset, attention=attention,
                         tolerance=tolerance, metadata=meta, check_batches=CONTRACT_BATCHES)
    report["contract"] = meta
    if json_out:
        print_json(report)
        return
    print(f"wrote {report['onnx']} ({report['model']}, {report['exporter']} exporter, opset {report['opset']}, "
          f"outputs: {', '.join(report['outputs'])})")
    worst = max(v["rel_diff"] for v in report["per_batch"].values())
    print(f"check: onnxruntime vs PyTorch at batch {', '.join(map(str, report['check_batches']))}: max abs diff "
          f"{report['max_abs_diff']:.2e}, relative {worst:.2e} (< {tolerance:.0e}: ok)")
    print(f"contract: input '{meta['input_name']}' float32 NCHW RGB {meta['input_height']}x{meta['input_width']}, "
          f"x/255 then (x - mean) / std outside the graph; output '{meta['output_name']}' {meta['output_dim']}-d, "
          f"{'L2-normalised' if meta['output_l2_normalized'] == 'true' else 'not L2-normalised'} ({meta['metric']})")


def _check_amp(amp: Optional[str]) -> None:
    if amp is not None and amp not in INFERENCE_AMP_CHOICES:
        raise AttnReidError(f"--amp is {amp!r}; expected one of: {', '.join(INFERENCE_AMP_CHOICES)}")


@index_app.command("build")
def index_build(
    images_dir: Path = typer.Argument(..., help="Folder of gallery images (searched recursively)."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="The model: a run folder or a checkpoint (.pth)."),
    out: Path = typer.Option(..., "--out", help="Index folder (created; an existing one is resumed)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config overriding the checkpoint's (test feature)."),
    camera_regex: str = typer.Option(DEFAULT_CAMERA_REGEX, "--camera-regex",
                                     help="Regex whose first group is the camera id in a file name; '' for none."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    shard_size: int = typer.Option(1024, "--shard-size", help="Images per shard file (resume granularity)."),
    flip: bool = typer.Option(False, "--flip/--no-flip", help="Average each image's feature with its mirror's."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    amp: Optional[str] = typer.Option(None, "--amp", help=AMP_HELP),
    backend: Optional[str] = typer.Option(None, "--backend", help=INFER_BACKEND_HELP),
    calibration: Optional[str] = typer.Option(
        None, "--calibration", help="calibration.json of this model for 'search --fpr' (default: the one beside the "
        "checkpoint, when there is one; '' for none). One made with other features is refused."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Extract features of every image in a folder into a resumable index."""
    from attnreid.deploy.extractor import FeatureExtractor  # torch: imported when the command runs, not for --help
    from attnreid.deploy.index import build_index
    from attnreid.distributed import DistContext

    if shard_size < 1:
        raise AttnReidError(f"--shard-size is {shard_size}; it must be >= 1")
    _check_amp(amp)
    if backend is not None and backend not in INFERENCE_BACKENDS:
        raise AttnReidError(f"--backend is {backend!r}; expected one of: {', '.join(INFERENCE_BACKENDS)}")
    check_output_path(out, "dir")
    dev = device_option(device)
    source = _model_option(checkpoint, config, overrides)
    ext = FeatureExtractor(source.cfg, checkpoint=source.checkpoint, device=dev, batch_size=batch_size, flip=flip,
                           amp=amp, backend=backend)
    if calibration is None:
        from attnreid.deploy.calibration import default_path

        found = default_path(source.checkpoint)
        calibration = str(found) if found.is_file() else ""
    ctx = DistContext.from_env()  # under torchrun: each rank embeds its share of the shards, rank 0 writes
    try:
        summary = build_index(ext, images_dir, out, camera_regex=camera_regex, shard_size=shard_size,
                              progress=not json_out, calibration=calibration or None, ctx=ctx)
    except KeyboardInterrupt:
        interrupted(f"the images indexed so far are kept in {out}; run the same command again to index the rest")
    finally:
        ctx.close()
    if summary is None:  # not rank 0
        return
    if json_out:
        print_json(summary)
        return
    print(f"index {summary['index']}: {summary['num_vectors']} images ({summary['added']} added, "
          f"{summary['already_indexed']} already indexed, {len(summary['skipped'])} skipped) "
          f"in {summary['seconds']:.1f} s")
    if summary.get("calibration"):
        print(f"calibration: {summary['calibration']} ('attnreid search --fpr' can decide same person or not)")
    for item in summary["skipped"]:
        print(f"skipped {item['path']}: {item['error']}")


def _model_option(checkpoint: Path, config: Optional[Path], overrides: Optional[List[str]] = None):
    """``--checkpoint`` (a run folder or a checkpoint) and an optional ``--config`` -> the model's source."""
    from attnreid.engine.model_source import CONFIG_SUFFIXES

    if checkpoint.suffix.lower() in CONFIG_SUFFIXES:
        raise AttnReidError(f"--checkpoint {checkpoint} is a config: give it with --config, and the weights (a run "
                            "folder or a .pth) with --checkpoint")
    if config is not None:
        return resolve_model(config, overrides, checkpoint)
    return resolve_model(checkpoint, overrides)


@app.command("search")
def search(
    index: Path = typer.Argument(..., help="Index folder from 'attnreid index build'."),
    queries: List[Path] = typer.Argument(..., help="Query image(s)."),
    top_k: int = typer.Option(10, "--top-k", "-k", help="Results per query."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    exclude_same_camera: bool = typer.Option(False, "--exclude-same-camera",
                                             help="Leave out gallery images from the query's camera."),
    backend: str = typer.Option("torch", "--backend", help="torch (exact) or faiss."),
    faiss_index: str = typer.Option("flat", "--faiss-index", help="faiss index: flat (exact), ivf or hnsw."),
    nprobe: int = typer.Option(32, "--nprobe", help="IVF cells visited per query."),
    ef_search: int = typer.Option(128, "--ef-search", help="HNSW candidate list size."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Query model, a run folder or a checkpoint "
                                              "(default: the checkpoint the index was built with)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config to go with --checkpoint."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    amp: Optional[str] = typer.Option(None, "--amp", help=AMP_HELP),
    fpr: Optional[float] = typer.Option(
        None, "--fpr", help="Mark each hit as a match when its distance is below the threshold the index's "
        "calibration gives for this false-positive rate (e.g. 1e-3); 'no match' when none is."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="As --fpr, with a distance threshold."),
) -> None:
    """Rank the indexed gallery for each query image (distances: smaller is closer)."""
    from attnreid.deploy.extractor import FeatureExtractor  # torch: imported when the command runs, not for --help
    from attnreid.deploy.index import FAISS_KINDS, FaissParams, GalleryIndex, search_images

    _check_amp(amp)
    if backend not in ("torch", "faiss"):
        raise AttnReidError(f"--backend is {backend!r}; expected torch or faiss")
    if faiss_index not in FAISS_KINDS:
        raise AttnReidError(f"--faiss-index is {faiss_index!r}; expected one of: {', '.join(FAISS_KINDS)}")
    dev = device_option(device)
    gallery = GalleryIndex.load(index)
    decide = fpr is not None or threshold is not None
    if decide:
        gallery.threshold(fpr, threshold)  # a bad --fpr / missing calibration before the model loads
    ckpt = checkpoint or gallery.meta.get("checkpoint")
    if ckpt is None:
        raise AttnReidError(f"index {index} records no checkpoint; pass --checkpoint")
    flip = bool(gallery.meta.get("flip", False))
    source = _model_option(Path(ckpt), config)
    ext = FeatureExtractor(source.cfg, checkpoint=source.checkpoint, device=dev, flip=flip, amp=amp)
    results = search_images(gallery, ext, [str(q) for q in queries], k=top_k,
                            exclude_same_camera=exclude_same_camera, backend=backend, faiss_index=faiss_index,
                            faiss_params=FaissParams(nprobe=nprobe, ef_search=ef_search), fpr=fpr,
                            threshold=threshold)
    if json_out:
        print_json({"index": str(index), "metric": gallery.meta["metric"], "backend": backend,
                    "faiss_index": faiss_index if backend == "faiss" else None, "top_k": top_k,
                    **({"fpr": fpr, "threshold": results[0]["threshold"]} if decide and results else {}),
                    "queries": results})
        return
    metric = gallery.meta["metric"]
    rule = ""
    if decide and results:
        rule = f"; match: distance < {results[0]['threshold']:.4g}" + (f" (calibrated FPR {fpr:g})" if fpr else "")
    for res in results:
        cam = f" (camera {res['camera']})" if res["camera"] >= 0 else ""
        print(f"query {res['query']}{cam}: top {len(res['results'])} of {len(gallery)} by {metric}{rule}")
        if decide and res["decision"] == "no match":
            print("  no match")
        for r in res["results"]:
            mark = ("  match" if r["match"] else "  -") if decide else ""
            print(f"  {r['rank']:>4}  {r['distance']:.4f}  {r['path']}{mark}")
