"""Inference precision (eval.amp / --amp / FeatureExtractor(amp=)): the no-bf16 path, bf16 agreement, the policy."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_one_line_error, run_cli, set_batchnorm_statistics

import attnreid.precision as precision_mod
from attnreid.config import from_dict, load_config
from attnreid.data.datasets import build_dataset
from attnreid.deploy.extractor import FeatureExtractor
from attnreid.errors import ConfigError
from attnreid.inference import backend as inference
from attnreid.inference.backend import fastest_matching_path, inference_precision
from attnreid.inference.extract import extract_features
from attnreid.models import build_model

TINY = {"model": {"name": "mhsanet", "backbone": {"name": "mobilenetv3_small"},
                  "mhsanet": {"num_heads": 2, "attention_dim": 16, "embed_dim": 16}},
        "data": {"height": 64, "width": 32, "test_batch_size": 8, "workers": 0}}


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def tiny(synthetic_root):
    """A tiny MHSA-Net with BatchNorm statistics set on noise (else every image has the same feature)."""
    cfg = from_dict(TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, 5)
    set_batchnorm_statistics(model, [torch.randn(8, 3, 64, 32) for _ in range(3)])
    items = build_dataset("market1501", synthetic_root).gallery[:12]
    return model.eval(), cfg, items


@pytest.fixture
def no_bf16_cpu(monkeypatch, fresh_announcements):
    """This process sees a CPU with AVX2 and AVX-512F but neither AMX nor AVX512-BF16."""
    for var in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "fma"}))


def test_auto_on_a_cpu_without_bf16_is_plain_float32(no_bf16_cpu, tiny, capsys):
    model, cfg, items = tiny
    p = inference_precision("auto", "cpu")
    assert p.dtype is None and p.reason == "CPU has neither AMX nor AVX512-BF16"
    auto, pids, _ = extract_features(model, items, cfg.data, amp="auto")
    err = capsys.readouterr().err
    assert err.count("inference precision: float32 (CPU has neither AMX nor AVX512-BF16)") == 1
    extract_features(model, items, cfg.data, amp="auto")
    assert "inference precision" not in capsys.readouterr().err  # printed once per process
    assert auto.dtype == torch.float32 and auto.shape == (len(items), model.feature_dim)
    # unchanged: exactly what a plain float32 forward pass gives, batch for batch
    off, _, _ = extract_features(model, items, cfg.data, amp="off")
    assert torch.equal(auto, off)
    ext = FeatureExtractor.from_model(model, cfg)
    assert ext.precision.dtype is None
    x = torch.stack([ext.preprocess(p) for p, _, _ in items[:4]])
    with torch.inference_mode():
        plain = model(x)
    assert torch.equal(ext.forward_batch(x), plain)


def test_kernel_env_cap_also_means_float32(monkeypatch):
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    p = inference_precision("auto", "cpu")
    assert p.dtype is None and "DNNL_MAX_CPU_ISA=AVX2" in p.reason


def test_bf16_features_agree_with_float32(tiny):
    """bf16 autocast (native or emulated: the same rounding) keeps the features' direction."""
    model, cfg, items = tiny
    fp32, _, _ = extract_features(model, items, cfg.data, amp="off")
    bf16, _, _ = extract_features(model, items, cfg.data, amp="bf16")
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # autocast really ran
    cos = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per value); through a dozen layers
    # of a random network that costs at most a few 1e-3 of cosine, far from the 1e-1 a wrong
    # path (e.g. features of other images) would give.
    assert float(cos.mean()) > 0.99 and float(cos.min()) > 0.97, cos


def test_precision_choice_is_validated(tiny, tmp_path):
    model, cfg, _ = tiny
    with pytest.raises(ConfigError, match="'eval.amp'"):
        load_config(None, ["eval.amp=int4"])
    with pytest.raises(ConfigError, match="'train.amp'"):  # int8 is an inference precision only
        load_config(None, ["train.amp=int8"])
    # an unquoted off is a YAML boolean; for these keys it means the word
    cfg_off = load_config(None, ["eval.amp=off", "train.amp=off"])
    assert cfg_off.eval.amp == cfg_off.train.amp == "off"
    with pytest.raises(ConfigError, match="'amp' is 'half'"):
        FeatureExtractor.from_model(model, cfg, amp="half")
    assert FeatureExtractor.from_model(model, cfg, amp="off").precision.describe() == "float32 (amp=off)"
    code, _, err = run_cli(["index", "build", str(tmp_path), "--checkpoint", str(tmp_path / "x.pth"),
                            "--out", str(tmp_path / "idx"), "--amp", "half"])
    assert_one_line_error(code, err, "--amp", "half")


def test_fastest_matching_path_skips_paths_that_disagree_or_failed():
    rows = [{"path": "eager_fp32", "img_per_s": 10.0, "mean_cosine": 1.0},
            {"path": "eager_bf16", "img_per_s": 30.0, "mean_cosine": 0.9995},
            {"path": "compile_bf16", "img_per_s": 40.0, "mean_cosine": 0.99},
            {"path": "compile_fp32", "img_per_s": None, "error": "did not finish"},
            {"path": "onnxruntime_fp32", "img_per_s": 20.0, "mean_cosine": 1.0}]
    assert fastest_matching_path(rows) == "eager_bf16"
    assert fastest_matching_path(rows, threshold=0.9999) == "onnxruntime_fp32"
    assert fastest_matching_path(rows[3:4]) is None


class AutocastSensitive(torch.nn.Module):
    """Features that turn into other features under CPU autocast (a model bf16 breaks)."""

    feature_dim = 4

    def forward(self, x):
        f = x.float().mean(dim=(2, 3)).repeat(1, 2)[:, :4] + torch.arange(4.0)
        if torch.is_autocast_enabled("cpu"):
            f = f.flip(1) * torch.tensor([1.0, -1.0, 1.0, -1.0])
        return f


@pytest.fixture
def bf16_cpu(monkeypatch, fresh_announcements):
    """This process sees a CPU with AVX512-BF16, whatever it really has (bf16 is then emulated)."""
    for var in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(precision_mod, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))


def test_settle_keeps_bf16_only_when_it_matches_float32(bf16_cpu):
    auto = inference_precision("auto", "cpu")
    assert auto.dtype == torch.bfloat16 and inference.needs_check(auto)
    same = inference.settle(auto, lambda: torch.linspace(1, 2, 12).reshape(3, 4))
    assert same.dtype == torch.bfloat16 and same.requested == "bf16" and not inference.needs_check(same)
    assert "matches float32 on this model: mean cosine 1.00000 on the first 3 images" in same.reason
    model = AutocastSensitive()
    x = torch.rand(3, 3, 4, 4)
    worse = inference.settle(auto, lambda: model(x))
    assert worse.dtype is None and worse.requested == "off"
    assert "bf16 features differ from float32 on this model" in worse.reason
    explicit = inference_precision("bf16", "cpu")
    assert inference.settle(explicit, lambda: model(x)) is explicit  # asked for: no check


def test_auto_falls_back_to_float32_where_bf16_breaks_the_model(bf16_cpu, tiny, capsys):
    _, cfg, items = tiny
    model = AutocastSensitive()
    auto, _, _ = extract_features(model, items, cfg.data, amp="auto")
    off, _, _ = extract_features(model, items, cfg.data, amp="off")
    assert torch.equal(auto, off)
    err = capsys.readouterr().err
    assert "inference precision: float32 (CPU has AVX512-BF16, but bf16 features differ" in err
    ext = FeatureExtractor.from_model(model, cfg)
    x = torch.rand(2, 3, 64, 32)
    assert torch.equal(ext.forward_batch(x), model(x)) and ext.precision.dtype is None


def test_the_check_is_made_once_per_model_weights(bf16_cpu):
    model = torch.nn.Linear(4, 4)
    x = torch.rand(3, 4)
    calls = []

    def forward():
        calls.append(1)
        return model(x)

    auto = inference_precision("auto", "cpu")
    first = inference.settle_for(model, auto, forward)
    assert inference.settle_for(model, auto, forward) is first and len(calls) == 2  # one check: fp32 + bf16
    with torch.no_grad():
        model.weight.add_(0.5)  # new weights (a training step): checked again
    inference.settle_for(model, auto, forward)
    assert len(calls) == 4
