"""One line, exit status 2, for every class of bad input an audit tried (issue 26), with the exact line.

Each row builds one hostile file or folder and runs one command in-process
(``helpers.run_cli``); the whole stderr must be that one line. ``{d}`` is the row's temporary
folder, ``{ckpt}`` / ``{cfg}`` the tiny checkpoint and config; ``…`` stands for a part that
comes from a library's own message (zlib, torch) and may change with its version.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import assert_one_line_error, run_cli
from rel_helpers import TINY, merge, save_checkpoint_of

pytestmark = pytest.mark.usefixtures("one_thread_module")


# -- hostile files -------------------------------------------------------------------------

def _ids(n_q: int = 3, n_g: int = 4) -> dict:
    return {"query_pids": np.arange(n_q), "gallery_pids": np.arange(n_g) % n_q,
            "query_camids": np.zeros(n_q, np.int64), "gallery_camids": np.ones(n_g, np.int64)}


def _flip_last_data_byte(path: Path, member: str) -> None:
    """Corrupt one byte of a stored zip member's data: its CRC no longer matches."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = bytearray(path.read_bytes())
    fnlen, extralen = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + fnlen + extralen
    data[start + info.compress_size - 1] ^= 0xFF
    path.write_bytes(bytes(data))


def _npy_member(zf: zipfile.ZipFile, name: str, header: dict, body: bytes) -> None:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    zf.writestr(name, buf.getvalue() + body)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` (no pixel data follows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def _index(d: Path, shards: list, meta_drop: str = "") -> Path:
    idx = d / "idx"
    idx.mkdir()
    meta = {"version": 1, "model": "baseline", "feature_dim": 4, "config_hash": "x", "metric": "euclidean_sq",
            "camera_regex": None, "num_vectors": 0}
    meta.pop(meta_drop, None)
    (idx / "meta.json").write_text(json.dumps(meta))
    for i, feats in enumerate(shards):
        n = len(feats)
        np.savez(idx / f"shard-{i:05d}.npz", features=np.asarray(feats, np.float32),
                 paths=np.array([f"{i}_{k}.jpg" for k in range(n)]), camids=np.zeros(n, np.int64))
    return idx


def _run_with_eval(d: Path, name: str, ap) -> Path:
    run = d / name
    run.mkdir()
    n = len(ap)
    np.savez(run / "eval_per_query.npz", query_paths=np.array([f"q{i}.jpg" for i in range(n)]),
             query_pids=np.arange(n), query_camids=np.zeros(n, np.int64), ap=np.asarray(ap, np.float64),
             inp=np.asarray(ap, np.float64), rank1=np.ones(n), valid=np.ones(n, bool))
    return run


def _checkpoint_with_config(d: Path, tiny, name: str, **sections) -> Path:
    cfg = merge(merge(TINY, {"data": {"root": str(tiny["root"])}}), sections)
    path = d / name
    state = torch.load(tiny["ckpt"], weights_only=True)
    state["config"] = cfg
    torch.save(state, path)
    return path


# -- the rows --------------------------------------------------------------------------------
# Each builder gets (d, tiny, held) and returns the CLI arguments; ``held`` keeps objects
# (an open, locked file) alive while the command runs.

def b_shard_mixed_sizes(d, tiny, held):
    _index(d, [np.zeros((2, 4)), np.zeros((2, 8))])
    return ["search", d / "idx", "q.jpg", "--checkpoint", tiny["ckpt"]]


def b_meta_missing_key(d, tiny, held):
    _index(d, [np.zeros((2, 4))], meta_drop="metric")
    return ["search", d / "idx", "q.jpg", "--checkpoint", tiny["ckpt"]]


def b_shard_crc(d, tiny, held):
    idx = _index(d, [np.ones((2, 4))])
    _flip_last_data_byte(idx / "shard-00000.npz", "features.npy")
    return ["search", idx, "q.jpg", "--checkpoint", tiny["ckpt"]]


def b_shard_nan(d, tiny, held):
    _index(d, [np.array([[0, 0, 0, 0], [np.nan, 0, 0, 0]])])
    return ["search", d / "idx", "q.jpg", "--checkpoint", tiny["ckpt"]]


def b_index_in_use(d, tiny, held):
    idx = _index(d, [np.zeros((2, 4))])
    fh = open(idx / ".attnreid.lock", "w")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.write("pid 1 on testhost\n")
    fh.flush()
    held.append(fh)
    return ["index", "build", tiny["gallery"], "--checkpoint", tiny["ckpt"], "--out", idx]


def b_run_in_use(d, tiny, held):
    (d / "run").mkdir()
    fh = open(d / "run" / ".attnreid.lock", "w")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.write("pid 1 on testhost\n")
    fh.flush()
    held.append(fh)
    return ["train", tiny["cfg"], "--out", d / "run"]


def b_synth_overwrite_real(d, tiny, held):
    (d / "data" / "market1501" / "query").mkdir(parents=True)
    return ["data", "synth", "--out", d / "data", "--overwrite"]


def b_yaml_laughs(d, tiny, held):
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (d / "laughs.yaml").write_text("\n".join(lines) + "\n")
    return ["train", d / "laughs.yaml"]


def b_yaml_recursive(d, tiny, held):
    (d / "loop.yaml").write_text("data: &a\n  mean: [*a]\n")
    return ["train", d / "loop.yaml"]


def b_yaml_huge(d, tiny, held):
    (d / "big.yaml").write_text("# " + "x" * (1 << 20) + "\ntrain:\n  epochs: 1\n")
    return ["train", d / "big.yaml"]


def b_yaml_not_utf8(d, tiny, held):
    (d / "latin1.yaml").write_bytes(b"data:\n  root: caf\xe9\n")
    return ["train", d / "latin1.yaml"]


def b_yaml_interpolation(d, tiny, held):
    (d / "env.yaml").write_text("data:\n  root: ${oc.env:HOME}/data\n")
    return ["train", d / "env.yaml"]


def b_zip_member_huge(d, tiny, held):
    with zipfile.ZipFile(d / "big.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.jpg", b"\0" * (70 << 20))  # 70 MiB declared, 70 KiB stored
    return ["explain", tiny["cfg"], f"{d / 'big.zip'}::big.jpg", "--checkpoint", tiny["ckpt"], "--out", d / "x"]


def b_image_pixels(d, tiny, held):
    (d / "wide.png").write_bytes(_png_header(8000, 8000))
    return ["explain", tiny["cfg"], d / "wide.png", "--checkpoint", tiny["ckpt"], "--out", d / "x"]


def b_image_bomb(d, tiny, held):
    (d / "bomb.png").write_bytes(_png_header(30000, 30000))  # over twice Pillow's own limit
    return ["explain", tiny["cfg"], d / "bomb.png", "--checkpoint", tiny["ckpt"], "--out", d / "x"]


def b_npz_bomb(d, tiny, held):
    np.savez_compressed(d / "bomb.npz", query_features=np.zeros((3, 7_000_000), np.float32),
                        gallery_features=np.zeros((4, 1), np.float32), **_ids())
    return ["metrics", d / "bomb.npz"]


def b_npz_huge_header(d, tiny, held):
    np.savez(d / "huge.npz", gallery_features=np.zeros((4, 4), np.float32), **_ids(6))
    with zipfile.ZipFile(d / "huge.npz", "a") as zf:
        _npy_member(zf, "query_features.npy", {"descr": "<f4", "fortran_order": False, "shape": (6, 10 ** 10)},
                    b"\0" * 96)
    return ["metrics", d / "huge.npz"]


def b_npz_crc(d, tiny, held):
    np.savez(d / "crc.npz", distmat=np.ones((3, 4), np.float32), **_ids())
    _flip_last_data_byte(d / "crc.npz", "distmat.npy")
    return ["metrics", d / "crc.npz"]


def b_npz_zlib(d, tiny, held):
    np.savez_compressed(d / "z.npz", distmat=np.arange(12000, dtype=np.float32).reshape(3, 4000),
                        **_ids(3, 4000))
    with zipfile.ZipFile(d / "z.npz") as zf:
        info = zf.getinfo("distmat.npy")
    data = bytearray((d / "z.npz").read_bytes())
    fnlen, extralen = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + fnlen + extralen
    data[start:start + 8] = b"\xff" * 8  # an invalid deflate block
    (d / "z.npz").write_bytes(bytes(data))
    return ["metrics", d / "z.npz"]


def b_npz_strings(d, tiny, held):
    ids = _ids()
    ids["query_pids"] = np.array(["001", "002", "003"])
    np.savez(d / "str.npz", distmat=np.ones((3, 4), np.float32), **ids)
    return ["metrics", d / "str.npz"]


def b_npz_zero_dim(d, tiny, held):
    np.savez(d / "zero.npz", query_features=np.zeros((3, 0), np.float32),
             gallery_features=np.zeros((4, 0), np.float32), **_ids())
    return ["metrics", d / "zero.npz"]


def b_per_query_crc(d, tiny, held):
    a = _run_with_eval(d, "a", [0.5, 0.25, 1.0])
    _run_with_eval(d, "b", [0.5, 0.25, 1.0])
    _flip_last_data_byte(a / "eval_per_query.npz", "ap.npy")
    return ["compare", a, d / "b"]


def b_compare_nan(d, tiny, held):
    a = _run_with_eval(d, "a", [0.5, float("nan"), 1.0])
    _run_with_eval(d, "b", [0.5, 0.25, 1.0])
    return ["compare", a, d / "b"]


def b_ckpt_model_not_dict(d, tiny, held):
    state = torch.load(tiny["ckpt"], weights_only=True)
    state["model"] = [torch.zeros(1)]
    torch.save(state, d / "list.pth")
    return ["eval", tiny["cfg"], "--checkpoint", d / "list.pth"]


def b_ckpt_num_classes(d, tiny, held):
    state = torch.load(tiny["ckpt"], weights_only=True)
    state["num_classes"] = 10 ** 9
    torch.save(state, d / "classes.pth")
    return ["eval", tiny["cfg"], "--checkpoint", d / "classes.pth"]


def b_ckpt_height(d, tiny, held):
    return ["export", _checkpoint_with_config(d, tiny, "tall.pth", data={"height": 10 ** 6}), "--out", d / "m.onnx"]


def b_ckpt_heads(d, tiny, held):
    ckpt = _checkpoint_with_config(d, tiny, "heads.pth", model={"name": "mhsanet", "mhsanet": {"num_heads": 10 ** 6}})
    return ["export", ckpt, "--out", d / "m.onnx"]


def b_ckpt_interpolation(d, tiny, held):
    ckpt = _checkpoint_with_config(d, tiny, "env.pth", data={"root": "${oc.env:HOME}"})
    return ["index", "build", tiny["gallery"], "--checkpoint", ckpt, "--out", d / "idx"]


def b_train_out_file(d, tiny, held):
    (d / "afile").write_text("not a folder")
    return ["train", tiny["cfg"], "--out", d / "afile"]


def b_train_out_under_file(d, tiny, held):
    (d / "afile").write_text("not a folder")
    return ["train", tiny["cfg"], "--out", d / "afile" / "run"]


def _resume_row(d, tiny, change) -> list:
    run = d / "run"
    shutil.copytree(tiny["trained"], run)
    last = run / "checkpoints" / "last.pth"
    state = torch.load(last, weights_only=True)
    change(state)
    torch.save(state, last)
    return ["train", "--resume", "--out", run, "train.epochs=2"]


def b_resume_bad_rng(d, tiny, held):
    return _resume_row(d, tiny, lambda s: s.update(rng={}))


def b_resume_bad_epoch(d, tiny, held):
    return _resume_row(d, tiny, lambda s: s.update(epoch=-3))


def b_report_foreign_page(d, tiny, held):
    (d / "site").mkdir()
    (d / "site" / "index.html").write_text("<html>my own site</html>")
    (_run_with_eval(d, "a", [0.5]) / "eval.json").write_text('{"mAP": 0.5}')
    return ["report", d / "a", "--out", d / "site"]


def b_explain_foreign_folder(d, tiny, held):
    (d / "photos").mkdir()
    (d / "photos" / "attention_000.png").write_bytes(b"my photo")
    query = sorted((tiny["root"] / "market1501" / "query").glob("*.jpg"))[0]
    return ["explain", tiny["cfg"], query, "--checkpoint", tiny["ckpt"], "--out", d / "photos"]


# -- hostile cases tried after the (docs/reliability.md lists what each found) -------

def h_out_fifo(d, tiny, held):
    import os

    os.mkfifo(d / "fifo.npz")
    return ["extract", tiny["cfg"], "--checkpoint", tiny["ckpt"], "--split", "query", "--out", d / "fifo.npz"]


def h_nan_in_yaml(d, tiny, held):
    (d / "nan.yaml").write_text(yaml.safe_dump(merge(TINY, {"data": {"random_erasing": float("nan")}})))
    return ["train", d / "nan.yaml"]


def h_workers(d, tiny, held):
    return ["eval", tiny["cfg"], "--checkpoint", tiny["ckpt"], "data.workers=100000"]


def h_threads(d, tiny, held):
    return ["eval", tiny["cfg"], "--checkpoint", tiny["ckpt"], "train.threads=1000000000"]


def h_sparse_image(d, tiny, held):
    with open(d / "sparse.jpg", "wb") as fh:
        fh.truncate(10 << 30)  # 10 GiB that take no disk
    return ["explain", tiny["cfg"], d / "sparse.jpg", "--checkpoint", tiny["ckpt"], "--out", d / "x"]


def h_checkpoint_bomb(d, tiny, held):
    shutil.copy(tiny["ckpt"], d / "bomb.pth")
    with zipfile.ZipFile(d / "bomb.pth", "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb/data/999", b"\0" * (70 << 20))
    return ["eval", tiny["cfg"], "--checkpoint", d / "bomb.pth"]


def h_checkpoint_config_laughs(d, tiny, held):
    state = torch.load(tiny["ckpt"], weights_only=True)
    shared = [0.5]
    for _ in range(25):  # 2^25 values once expanded, 26 lists in the file
        shared = [shared, shared]
    state["config"] = merge(state["config"], {"data": {"mean": shared}})
    torch.save(state, d / "laughs.pth")
    return ["export", d / "laughs.pth", "--out", d / "m.onnx"]


def h_lock_is_a_folder(d, tiny, held):
    (d / "run" / ".attnreid.lock").mkdir(parents=True)
    return ["train", tiny["cfg"], "--out", d / "run"]


def h_max_rank(d, tiny, held):
    np.savez(d / "m.npz", distmat=np.ones((3, 4), np.float32), **_ids())
    return ["metrics", d / "m.npz", "--max-rank", "10000000000"]


def h_bootstrap(d, tiny, held):
    np.savez(d / "m.npz", distmat=np.ones((3, 4), np.float32), **_ids())
    return ["compare", d / "m.npz", d / "m.npz", "--bootstrap", "1000000000"]


def h_batch_size(d, tiny, held):
    return ["index", "build", tiny["gallery"], "--checkpoint", tiny["ckpt"], "--out", d / "idx",
            "--batch-size", "1000000000"]


def h_resume_past_the_end(d, tiny, held):
    return _resume_row(d, tiny, lambda s: s.update(epoch=10 ** 18))


def h_yaml_unhashable_key(d, tiny, held):
    (d / "key.yaml").write_text("? [a, b]\n: c\n")
    return ["train", d / "key.yaml"]


SHARD_FIX = "delete it and re-run 'attnreid index build'"
ROWS = [
    # 1. the gallery index
    ("index: shards of mixed feature sizes", b_shard_mixed_sizes,
     "index shard {d}/idx/shard-00001.npz: 'features' is float32 of shape (2, 8), but the index holds 4-d float "
     f"features (2 rows here); {SHARD_FIX}"),
    ("index: meta.json missing a key", b_meta_missing_key,
     "index meta file {d}/idx/meta.json has no 'metric'; rebuild the index into a new folder"),
    ("index: a shard with a bad CRC (BadZipFile)", b_shard_crc,
     "{d}/idx/shard-00000.npz (index shard) is not a readable .npz file (Bad CRC-32 for file 'features.npy'); "
     f"{SHARD_FIX}"),
    ("index: NaN features in a shard", b_shard_nan,
     f"index shard {{d}}/idx/shard-00000.npz holds non-finite (NaN/inf) features; {SHARD_FIX}"),
    ("index: a build into an index in use", b_index_in_use,
     "index {d}/idx is in use by another attnreid process (pid 1 on testhost; lock {d}/idx/.attnreid.lock); "
     "wait for it to finish or choose another folder"),
    # 2. one train per run folder
    ("train: a run folder in use", b_run_in_use,
     "run folder {d}/run is in use by another attnreid process (pid 1 on testhost; lock {d}/run/.attnreid.lock); "
     "wait for it to finish or choose another folder"),
    # 3. --overwrite deletes only what attnreid wrote
    ("data synth --overwrite on a real data set", b_synth_overwrite_real,
     "{d}/data/market1501 was not generated by attnreid (no synthetic.json from its generator); --overwrite "
     "replaces only a synthetic set: remove it yourself or choose another --out"),
    # 6. bounds
    ("YAML: nested anchors (billion laughs)", b_yaml_laughs,
     "config file {d}/laughs.yaml is refused: its anchors and aliases expand to more than 100000 values"),
    ("YAML: a recursive alias", b_yaml_recursive,
     "config file {d}/loop.yaml is refused: it holds a recursive alias (an anchor used inside itself)"),
    ("YAML: a file over the size bound", b_yaml_huge,
     "config file {d}/big.yaml is 1048598 bytes; attnreid reads config files of at most 1048576 bytes"),
    ("zip: a member declaring 70 MiB", b_zip_member_huge,
     "image {d}/big.zip::big.jpg is 70.0 MiB uncompressed; attnreid reads at most 64.0 MiB here"),
    ("image: over the pixel bound", b_image_pixels,
     "image {d}/wide.png is 8000 x 8000 pixels; attnreid decodes images of at most 50000000 pixels"),
    ("image: Pillow's DecompressionBombError", b_image_bomb,
     "image {d}/bomb.png declares more pixels than Pillow's limit (a decompression bomb?); attnreid decodes "
     "images of at most 50000000 pixels"),
    ("npz: a member expanding over 100x", b_npz_bomb,
     "{d}/bomb.npz: member 'query_features.npy' expands from … to 80.1 MiB, more than 100x (a decompression "
     "bomb?); attnreid does not read it"),
    ("npz: a header claiming a huge shape", b_npz_huge_header,
     "{d}/huge.npz: array 'query_features' declares shape (6, 10000000000) of float32 (223.5 GiB) but holds "
     "96 bytes; the file is corrupt"),
    ("checkpoint: num_classes 10^9", b_ckpt_num_classes,
     "checkpoint {d}/classes.pth was trained with 4 classes but the baseline model has 1000000000"),
    ("checkpoint config: height 10^6", b_ckpt_height,
     "checkpoint {d}/tall.pth: config key 'data.height' is 1000000; it must be <= 4096"),
    ("checkpoint config: 10^6 heads", b_ckpt_heads,
     "checkpoint {d}/heads.pth: config key 'model.mhsanet.num_heads' is 1000000; it must be <= 64"),
    # 7. tracebacks that became one line
    ("npz: a bad CRC (BadZipFile)", b_npz_crc,
     "{d}/crc.npz is not a readable .npz file (Bad CRC-32 for file 'distmat.npy')"),
    ("npz: a broken deflate stream (zlib.error)", b_npz_zlib,
     "{d}/z.npz is not a readable .npz file (Error -3 while decompressing data: …)"),
    ("eval_per_query.npz with a bad CRC", b_per_query_crc,
     "{d}/a/eval_per_query.npz is not a readable .npz file (Bad CRC-32 for file 'ap.npy')"),
    ("YAML: not UTF-8", b_yaml_not_utf8, "config file {d}/latin1.yaml is not UTF-8 text (byte 17); save it as UTF-8"),
    ("train --out a file", b_train_out_file, "output folder {d}/afile is a file; expected a folder (or a new path)"),
    ("train --out under a file", b_train_out_under_file,
     "output folder {d}/afile/run cannot be created: {d}/afile is a file, not a folder"),
    ("npz: string-typed ids", b_npz_strings, "{d}/str.npz: 'query_pids' holds <U3 values; expected integer ids"),
    ("checkpoint: 'model' not a dict", b_ckpt_model_not_dict,
     "checkpoint {d}/list.pth: its 'model' entry is not a state dict (names to tensors), but list"),
    ("resume: a bad RNG state", b_resume_bad_rng,
     "checkpoint {d}/run/checkpoints/last.pth: its RNG state ('rng') is not valid ('torch')"),
    ("resume: a negative epoch", b_resume_bad_epoch,
     "checkpoint {d}/run/checkpoints/last.pth: 'epoch' is -3; expected a whole number >= 0"),
    # 8. silent wrong answers
    ("compare: NaN AP", b_compare_nan,
     "{d}/a: 'ap' of 1 valid queries is NaN or outside [0, 1] (e.g. nan); it cannot be compared (evaluate the "
     "run again)"),
    ("metrics: 0-dimensional features", b_npz_zero_dim,
     "{d}/zero.npz: 'query_features' has shape (3, 0); expected one row of at least one number per image"),
    ("report: a folder holding someone else's index.html", b_report_foreign_page,
     "--out {d}/site holds an index.html that attnreid did not write; choose a new or empty folder, or pass "
     "--overwrite to write into it anyway"),
    ("explain: a folder of someone else's files", b_explain_foreign_folder,
     "--out {d}/photos holds files but no attnreid page; choose a new or empty folder, or pass "
     "--overwrite to write into it anyway"),
    # 9. untrusted configs
    ("YAML: an interpolation", b_yaml_interpolation,
     "config key 'data.root' in {d}/env.yaml holds an interpolation '${{oc.env:HOME}}/data'; attnreid does not "
     "resolve ${{...}} (write the value itself)"),
    ("checkpoint config: an interpolation", b_ckpt_interpolation,
     "config key 'data.root' in checkpoint {d}/env.pth holds an interpolation '${{oc.env:HOME}}'; attnreid does "
     "not resolve ${{...}} (write the value itself)"),
    # hostile cases tried after the issue's
    ("hostile: --out is a FIFO", h_out_fifo,
     "{d}/fifo.npz exists and is not a regular file (a device, FIFO or socket); attnreid writes only regular files "
     "there"),
    ("hostile: a NaN in a config", h_nan_in_yaml, "config key 'data.random_erasing' is nan; it must be a finite number"),
    ("hostile: 100000 loader workers", h_workers, "config key 'data.workers' is 100000; it must be <= 64"),
    ("hostile: 10^9 threads", h_threads, "config key 'train.threads' is 1000000000; it must be <= 1024"),
    ("hostile: a sparse 10 GiB image", h_sparse_image,
     "image {d}/sparse.jpg is 10737418240 bytes; attnreid reads images of at most 67108864 bytes"),
    ("hostile: a checkpoint holding a zip bomb", h_checkpoint_bomb,
     "checkpoint {d}/bomb.pth: member 'bomb/data/999' expands from … to 70.0 MiB, more than 100x (a decompression "
     "bomb?); attnreid does not read it"),
    ("hostile: a checkpoint config of shared references", h_checkpoint_config_laughs,
     "config in checkpoint {d}/laughs.pth holds more than 100000 values; attnreid refuses it"),
    ("hostile: the lock file is a folder", h_lock_is_a_folder,
     "cannot lock run folder {d}/run: {d}/run/.attnreid.lock: Is a directory"),
    ("hostile: metrics --max-rank 10^10", h_max_rank, "--max-rank is 10000000000; it must be in 1..100000"),
    ("hostile: compare --bootstrap 10^9", h_bootstrap, "bootstrap resamples is 1000000000; it must be in 1..100000"),
    ("hostile: index build --batch-size 10^9", h_batch_size, "batch_size is 1000000000; it must be in 1..4096"),
    ("hostile: resume a checkpoint past its run's end", h_resume_past_the_end,
     "checkpoint {d}/run/checkpoints/last.pth is at epoch 1000000000000000000, past train.epochs = 2; to extend the "
     "run pass train.epochs=N with N >= 1000000000000000000"),
    ("hostile: a YAML key that is a list", h_yaml_unhashable_key, "config file {d}/key.yaml is not valid YAML (line 1)"),
]


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    """``tiny`` plus ``trained``: a run folder of one short epoch, for the resume rows."""
    run = tmp_path_factory.mktemp("trained") / "run"
    code, _, err = run_cli(["train", tiny["cfg"], "--out", run])
    assert code == 0, err
    return {**tiny, "trained": run}


def _pattern(expected: str) -> re.Pattern:
    return re.compile(".+?".join(re.escape(part) for part in expected.split("…")))


@pytest.mark.parametrize("name, build, expected", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gets_its_one_line(name, build, expected, tiny_run, tmp_path):
    held: list = []
    try:
        args = build(tmp_path, tiny_run, held)
        code, _, err = run_cli(args)
    finally:
        for fh in held:
            fh.close()
    assert_one_line_error(code, err)
    line = err.strip()
    want = "error: " + expected.format(d=tmp_path)
    assert _pattern(want).fullmatch(line), f"\n got: {line}\nwant: {want}"
