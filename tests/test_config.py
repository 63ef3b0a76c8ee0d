from pathlib import Path

import pytest

from attnreid.config import Config, load_config, save_config, to_dict
from attnreid.errors import ConfigError


def test_defaults_match_spec():
    cfg = load_config()
    assert (cfg.data.height, cfg.data.width) == (384, 128)
    assert cfg.model.mhsanet.num_heads == 8
    assert cfg.loss.lambda_fdrt == 1e-4 and cfg.loss.lambda_ihtl == 1.0 and cfg.loss.lambda_acm == 1e-3
    assert cfg.loss.acm_gamma == 1e-3
    # docs/spec.md §1: the authors' distances and margins by default; Eq. 3 and 12 as written.
    assert (cfg.loss.triplet_distance, cfg.loss.triplet_margin) == ("euclidean", "soft")
    assert (cfg.loss.ihtl_distance, cfg.loss.ihtl_margin) == ("euclidean", "soft")
    assert (cfg.loss.fdrt_form, cfg.loss.acm_form) == ("paper", "paper") and cfg.model.mhsanet.rlm_out_norm
    assert cfg.optim.milestones == [200, 300] and cfg.optim.warmup_epochs == 50


def test_base_inheritance_and_overrides(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 10\nmodel:\n  mhsanet:\n    num_heads: 4\n")
    (tmp_path / "row.yaml").write_text("_base_: base.yaml\nmodel:\n  mhsanet:\n    num_heads: 5\n")
    cfg = load_config(tmp_path / "row.yaml", ["train.epochs=3"])
    assert cfg.model.mhsanet.num_heads == 5 and cfg.train.epochs == 3


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.mhsanet.num_head=3", "did you mean 'model.mhsanet.num_heads'"),
        ("train.epochs=abc", "train.epochs"),
        ("model.mhsanet.num_heads=0", "model.mhsanet.num_heads"),
        ("model.mhsanet.fusion=mean", "saffm, concat, sum"),
        ("data.batch_size=10", "data.num_instances"),
        ("loss.acm_gamma=0", "loss.acm_gamma"),
        ("noequals", "KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("loss:\n  lambda_fdr: 0.1\n")
    with pytest.raises(ConfigError, match=r"loss.lambda_fdr' in .*typo.yaml; did you mean 'loss.lambda_fdrt'"):
        load_config(typo)


def test_roundtrip(tmp_path: Path):
    cfg = load_config(None, ["model.name=hacnn", "data.height=160", "data.width=64"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert isinstance(again, Config)


def test_loading_a_config_imports_no_torch():
    """The config and its choice lists (attnreid.choices) are torch-free: a CLI command or tool
    that only reads configs does not pay torch's import, and a bad value is still one line."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "from attnreid.config import load_config\n"
        "from attnreid.errors import ConfigError\n"
        f"cfg = load_config({str(root / 'configs/mhsanet/market1501.yaml')!r}, [])\n"
        "load_config(None, ['loss.ihtl_margin=3.0', 'data.workers=2', 'eval.backend=onnxruntime'])\n"
        "try:\n"
        "    load_config(None, ['loss.triplet_margin=-1'])\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["config key 'loss.triplet_margin' is '-1'; a numeric margin must be finite and >= 0", "False"]


def test_the_owners_registries_hold_the_config_choices():
    from attnreid import choices
    from attnreid.models import backbones, mhsanet

    assert tuple(mhsanet.FUSIONS) == choices.FUSIONS
    assert set(backbones.PRETRAINED_URLS) == set(choices.BACKBONES)
