"""Embed image files with an attnreid ONNX model, without attnreid or PyTorch.

    python examples/onnx_only.py MODEL.onnx IMG... --out FEATS.npy [--batch N]

Needs only onnxruntime, Pillow and numpy. Everything it needs to know about the model's
input and output it reads from the model's metadata (the contract `attnreid export`
writes, docs/deployment.md): input name, size, channel order, value scale, mean and std,
output name. FEATS.npy holds one float32 row per image, in the order given; it matches
`attnreid extract --folder` with eval.amp=off (float32) to a mean cosine above 0.9999.

Preprocessing, as attnreid does it: decode to RGB, resize each channel as float pixels
with Pillow's bilinear filter (anti-aliased when shrinking: the same filter as attnreid's
torch resize) to exactly H x W, scale to [0, 1], subtract the mean and divide by the std
per channel, lay out as N x 3 x H x W float32.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

NEEDED = ("input_name", "input_height", "input_width", "input_channel_order", "input_scale", "input_mean",
          "input_std", "output_name", "normalization")


def read_contract(session: ort.InferenceSession, path: str) -> dict:
    meta = session.get_modelmeta().custom_metadata_map
    missing = [k for k in NEEDED if k not in meta]
    if missing:
        raise SystemExit(f"error: {path} carries no attnreid inference contract (missing {', '.join(missing)}); "
                         f"export it with 'attnreid export'")
    if meta["normalization"] != "outside the graph" or meta.get("input_layout", "NCHW") != "NCHW":
        raise SystemExit(f"error: {path}: this script handles NCHW input normalised outside the graph")
    return {"input": meta["input_name"], "output": meta["output_name"], "size": (int(meta["input_height"]),
            int(meta["input_width"])), "bgr": meta["input_channel_order"].upper() == "BGR",
            "scale": float(meta["input_scale"]), "mean": np.array(json.loads(meta["input_mean"]), np.float32),
            "std": np.array(json.loads(meta["input_std"]), np.float32)}


def preprocess(path: str, contract: dict) -> np.ndarray:
    """One image file -> 3 x H x W float32, as attnreid's test transform."""
    height, width = contract["size"]
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: cannot read image {path}: {exc}") from None
    channels = [np.asarray(Image.fromarray(rgb[:, :, c].astype(np.float32), "F").resize((width, height),
                                                                                           Image.BILINEAR))
                for c in range(3)]
    x = np.stack(channels[::-1] if contract["bgr"] else channels) * contract["scale"]
    return ((x - contract["mean"][:, None, None]) / contract["std"][:, None, None]).astype(np.float32)


def embed(model: str, images: list, batch: int) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    contract = read_contract(session, model)
    rows = []
    for start in range(0, len(images), batch):
        x = np.stack([preprocess(p, contract) for p in images[start:start + batch]])
        rows.append(session.run([contract["output"]], {contract["input"]: x})[0])
    return np.concatenate(rows).astype(np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="ONNX file written by 'attnreid export'")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", required=True, help="output .npy (N x feature_dim float32)")
    parser.add_argument("--batch", type=int, default=32, help="images per onnxruntime call (default 32)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    feats = embed(args.model, args.images, args.batch)
    np.save(args.out, feats)
    print(f"wrote {args.out}: {feats.shape[0]} x {feats.shape[1]} float32", file=sys.stderr)


if __name__ == "__main__":
    main()
