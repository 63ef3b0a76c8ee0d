"""Outputs: a failed or rejected write leaves the user's file as it was; bad images are skipped, not fatal."""

from __future__ import annotations

import shutil
import struct
import zlib

import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_rejected_export_leaves_the_existing_file(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's good export")
    # tolerance 0: no export can pass its check, so this one is rejected after it was written
    code, _, err = run_cli(["export", tiny["ckpt"], "--out", out, "--tolerance", "0"])
    assert_one_line_error(code, err, f"ONNX check failed for {out}", f"{out} is unchanged")
    assert out.read_bytes() == b"the user's good export"
    assert _leftovers(tmp_path) == [], "a temporary file was left behind"


def test_an_extract_that_fails_while_writing_leaves_the_existing_file(tiny, tmp_path, monkeypatch):
    out = tmp_path / "feats.npz"
    np.savez(out, query_features=np.ones((2, 3), np.float32))
    before = out.read_bytes()

    def disk_full(file, *args, **kwargs):
        fh = open(file, "wb") if isinstance(file, (str, bytes)) or hasattr(file, "__fspath__") else file
        fh.write(b"PK\x03\x04 half an archive")
        fh.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run_cli(["extract", tiny["cfg"], "--checkpoint", tiny["ckpt"], "--split", "query", "--out", out])
    assert out.read_bytes() == before
    assert _leftovers(tmp_path) == [], "a temporary file was left behind"


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def test_index_build_skips_a_decompression_bomb_like_any_unreadable_image(tiny, tmp_path):
    import json

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for p in sorted(tiny["gallery"].glob("*.jpg"))[:4]:
        shutil.copy(p, gallery / p.name)
    (gallery / "bomb.png").write_bytes(_png_header(30000, 30000))  # Pillow refuses it at open
    code, out, err = run_cli(["index", "build", gallery, "--checkpoint", tiny["ckpt"], "--out", tmp_path / "idx",
                              "--device", "cpu", "--json"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["num_vectors"] == 4
    assert [s["path"] for s in summary["skipped"]] == [str((gallery / "bomb.png").resolve())]
    assert "decompression bomb" in summary["skipped"][0]["error"]


def test_report_writes_into_a_foreign_folder_only_with_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text('{"mAP": 0.5, "rank1": 0.5}')
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>my own site</html>")
    (site / "notes.txt").write_text("mine")
    args = ["report", run, "--out", site]
    code, _, err = run_cli(args)
    assert_one_line_error(code, err, f"--out {site} holds an index.html that attnreid did not write", "--overwrite")
    assert (site / "index.html").read_text() == "<html>my own site</html>"
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "notes.txt"]
    code, _, err = run_cli(args + ["--overwrite"])
    assert code == 0, err
    assert (site / "notes.txt").read_text() == "mine" and "attnreid report" in (site / "index.html").read_text()
    code, _, err = run_cli(args)  # now the folder holds attnreid's page: writing it again needs no flag
    assert code == 0, err


# -- hostile cases tried after the issue's ------------------------------------------------


def test_a_fifo_given_as_an_image_is_refused_not_waited_on(tiny, tmp_path):
    import os
    import threading

    fifo = tmp_path / "query.jpg"
    os.mkfifo(fifo)

    def unblock():  # should the read block after all, a writer that closes at once ends it (as empty)
        threading.Event().wait(60)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    threading.Thread(target=unblock, daemon=True).start()
    code, _, err = run_cli(["explain", tiny["cfg"], fifo, "--checkpoint", tiny["ckpt"], "--out", tmp_path / "x"])
    assert_one_line_error(code, err, f"image {fifo} is not a regular file")


def test_an_out_that_is_a_symlink_is_replaced_not_written_through(tiny, tmp_path):
    import os

    target = tmp_path / "elsewhere.txt"
    target.write_text("precious")
    link = tmp_path / "feats.npz"
    os.symlink(target, link)
    code, _, err = run_cli(["extract", tiny["cfg"], "--checkpoint", tiny["ckpt"], "--split", "query", "--out", link])
    assert code == 0, err
    assert target.read_text() == "precious" and not link.is_symlink()
    assert "query_features" in np.load(link).files


def test_report_survives_a_hostile_eval_json_and_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text("[" * 200_000 + "]" * 200_000)  # json recurses per level
    code, _, err = run_cli(["report", run, "--out", tmp_path / "a"])
    assert code == 0, err
    assert "eval.json could not be parsed" in (tmp_path / "a" / "index.html").read_text()
    (run / "eval.json").write_text('{"mAP": "high", "rank1": null, "cmc": [1, "x"], "cmc_ci": 3}')
    (run / "log.jsonl").write_text('garbage\n{"type": "train", "epoch": "x", "loss": "NaN"}\n[1]\n'
                                   + "[" * 100_000 + "\n")
    (run / "config.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                                     + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                                               for p, c in zip("abcdefgh", "bcdefghi"))
                                     + "model: {name: *i}\n")
    code, _, err = run_cli(["report", run, "--out", tmp_path / "b"])
    assert code == 0, err
    assert "config.yaml could not be parsed" in (tmp_path / "b" / "index.html").read_text()


def test_a_plot_that_fails_while_writing_leaves_the_existing_file(tmp_path):
    """Figures go through safe_io.save_figure: a savefig that dies half-way (Ctrl-C, a full
    disk) leaves the previous plot whole and no temporary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnreid.safe_io import save_figure

    out = tmp_path / "plot.png"
    fig = plt.figure()
    save_figure(fig, out)
    before = out.read_bytes()
    assert before.startswith(b"\x89PNG")

    class Dies:
        def savefig(self, fh, **kwargs):
            assert kwargs["format"] == "png"
            fh.write(b"half a png")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_figure(Dies(), out)
    plt.close(fig)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
