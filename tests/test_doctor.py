"""`attnreid doctor`: the report, its --json form, and the bf16 self-check with an injected fault."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import attnreid.precision as precision
from attnreid.cli import doctor
from helpers import run_cli


class WrongInBf16(nn.Conv2d):
    """A convolution whose bf16 kernel is wrong (triple the right value)."""

    def forward(self, x):
        out = super().forward(x)
        return out * 3 if torch.is_autocast_enabled("cpu") else out


@pytest.fixture
def auto_is(monkeypatch):
    """Pretend ``amp: auto`` finds native bf16 (``"AMX"``) or none (``None``) on this CPU."""
    def set_reason(reason):
        monkeypatch.setattr(precision, "cpu_bf16_reason", lambda flags=None: reason)
    return set_reason


@pytest.fixture
def tiny_self_check(monkeypatch):
    """Two small layers instead of the real list: a sound one and one that is wrong in bf16."""
    torch.manual_seed(0)
    monkeypatch.setattr(doctor, "SELF_CHECK", [
        ("sound conv", nn.Conv2d(4, 8, 3, padding=1), (2, 4, 6, 4), False),
        ("faulty conv", WrongInBf16(4, 8, 3, padding=1), (2, 4, 6, 4), True),
    ])


def test_json_report_has_what_a_bug_report_needs(synthetic_root, monkeypatch):
    monkeypatch.setenv("ATTNREID_DATA", str(synthetic_root))
    code, out, err = run_cli(["doctor", "--json", "--no-self-check", "--root", synthetic_root,
                              "--root", synthetic_root / "nothing-here"])
    assert code == 0, err
    r = json.loads(out)  # one JSON object, nothing else on stdout
    import attnreid

    assert (r["attnreid"], r["torch"]) == (attnreid.__version__, torch.__version__)
    assert set(r["cpu"]["flags"]) == {"amx_bf16", "avx512_bf16", "avx512f", "avx2"}
    assert all(isinstance(v, bool) for v in r["cpu"]["flags"].values())
    assert r["cpu"]["torch_threads"] == torch.get_num_threads()
    auto = precision.resolve_precision("auto", "cpu")
    assert r["precision_auto"] == {"cpu": auto.name, "reason": auto.reason}
    assert r["bf16_self_check"] == {"ran": False, "why": "--no-self-check"}
    assert set(r["packages"]) >= {"onnxruntime", "faiss", "openvino"}
    assert r["packages"]["onnxruntime"] is None or r["packages"]["onnxruntime"][0].isdigit()
    assert "19281 images" in r["inference_auto"] and "999 images" in r["inference_auto"]
    assert r["inference_auto"]["999 images"]["backend"] == "torch"
    roots = {row["origin"] + " " + str(row["root"]): row for row in r["data_roots"]}
    env_row = roots[f"$ATTNREID_DATA {synthetic_root}"]
    given = roots[f"--root {synthetic_root}"]
    assert env_row["datasets"] == given["datasets"]
    assert given["datasets"]["market1501"]["train_ids"] > 0 and list(given["datasets"]) == ["market1501"]
    missing = roots[f"--root {synthetic_root / 'nothing-here'}"]
    assert (missing["exists"], missing["datasets"]) == (False, {})


def test_self_check_finds_an_injected_bf16_fault(auto_is, tiny_self_check):
    auto_is("AMX")
    code, out, err = run_cli(["doctor", "--json"])
    assert code == 0, err
    sc = json.loads(out)["bf16_self_check"]
    assert sc["ran"] and not sc["ok"] and sc["calls"] == doctor.SELF_CHECK_CALLS
    sound, faulty = sc["layers"]
    assert (sound["name"], sound["ok"]) == ("sound conv", True)
    assert (faulty["name"], faulty["ok"], faulty["wrong_forward"], faulty["channels_last"]) == (
        "faulty conv", False, 1, True)

    code, out, err = run_cli(["doctor"])
    assert code == 0, err
    assert "bf16 kernel self-check (2 layers x 3 calls" in out and "FAULT: some bf16 kernels are wrong" in out
    assert "  sound conv on 2x4x6x4: ok" in out
    assert "  faulty conv on 2x4x6x4: FAULT (0 non-finite, 1 wrong of 1 compared" in out
    assert "runs the faulty ones in float32 (docs/training.md#bf16-kernel-faults)" in out


def test_self_check_passes_sound_kernels_and_is_skipped_in_float32(auto_is, tiny_self_check, monkeypatch):
    auto_is("AMX")
    monkeypatch.setattr(doctor, "SELF_CHECK", doctor.SELF_CHECK[:1])
    code, out, _ = run_cli(["doctor"])
    assert code == 0 and "(1 layers x 3 calls" in out and "): ok" in out
    auto_is(None)
    code, out, _ = run_cli(["doctor", "--json"])
    sc = json.loads(out)["bf16_self_check"]
    assert code == 0 and not sc["ran"] and sc["why"].startswith("amp: auto trains in float32 here (")


def test_text_report_lines(auto_is):
    auto_is(None)
    code, out, err = run_cli(["doctor", "--root", "/nonexistent/data"])
    assert code == 0 and err == ""
    assert out.startswith(f"attnreid ") and f"torch {torch.__version__}" in out.splitlines()[0]
    for start in ("CPU: ", "kernel-path variables: ", "amp: auto on the CPU: fp32 (", "bf16 kernel self-check: not run",
                  "optional packages: ", "eval.backend: auto for 19281 images: ", "eval.amp: auto: ",
                  "data root --root /nonexistent/data: does not exist"):
        assert any(line.startswith(start) for line in out.splitlines()), start
