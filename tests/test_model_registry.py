"""The model registry: a third model is one file and one registry entry, and nothing else names models.

``toy_model.py`` (beside this file, shown in docs/design.md) defines a tiny network and
registers its spec. With no other file edited, it trains for a step (its loss terms from its
entry, its head diagnostics because its entry says ``attention="heads"``), is evaluated,
exported to ONNX and shown in the report. Then an AST check over src/attnreid: no module but a
model's own file and the registry compares a model's name.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
from pathlib import Path

import pytest

from attnreid.config import load_config
from attnreid.errors import ConfigError
from attnreid.models.registry import MODELS, get_spec, model_names

pytestmark = pytest.mark.usefixtures("one_thread_module")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "attnreid"
BUILT_IN = ("baseline", "mhsanet", "hacnn")


@pytest.fixture(scope="module")
def toy():
    """``toy_model`` imported (which registers "toy"), unregistered again after this module."""
    module = importlib.import_module("toy_model")
    yield module
    MODELS.pop("toy", None)
    sys.modules.pop("toy_model", None)


def toy_cfg(root, *extra):
    return load_config(None, [
        "model.name=toy", "data.dataset=market1501", f"data.root={root}", "data.height=64", "data.width=32",
        "data.batch_size=8", "data.num_instances=2", "data.test_batch_size=32", "data.workers=0",
        "data.flip=false", "train.threads=1", "train.epochs=1", "train.max_steps_per_epoch=1",
        "train.eval_every=0", "train.log_every=1", "train.device=cpu", "train.amp=off", "optim.warmup_epochs=0",
        "loss.global_triplet=1", "eval.bootstrap=0", *extra])


@pytest.fixture(scope="module")
def toy_run(toy, synthetic_root, tmp_path_factory):
    from attnreid.engine.trainer import train

    run = tmp_path_factory.mktemp("toy") / "run"
    return run, train(toy_cfg(synthetic_root), run, quiet=True)


def test_the_toy_is_one_more_choice_of_the_config(toy, synthetic_root):
    from attnreid.models import build_model

    assert model_names() == (*BUILT_IN, "toy")
    assert build_model(toy_cfg(synthetic_root).model, 3).feature_dim == 16
    cfg = toy_cfg(synthetic_root, "model.test_feature=concat")  # MHSA-Net's: a test feature, but not the toy's
    with pytest.raises(ConfigError, match="'model.test_feature' is 'concat'; toy takes one of: default, global"):
        build_model(cfg.model, 3)


def test_the_toy_trains_one_step_with_its_own_terms_and_diagnostics(toy_run):
    run, result = toy_run
    assert result["status"] == "completed" and result["step"] == 1
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["type"] == "train")
    assert {"ce_global", "tri_global"} <= set(step) and not {"ce_saffm", "fdrt", "ce_local"} & set(step)
    diagnostics = next(r for r in records if r["type"] == "diagnostics")  # attention="heads"
    assert 0.0 <= diagnostics["head_overlap"] <= 1.0 and "fdrt" not in diagnostics  # no P: no FDRT


def test_the_toy_is_evaluated(toy_run):
    run, result = toy_run
    ev = json.loads((run / "eval.json").read_text())
    assert ev["model"] == "toy" and ev["feature_dim"] == 16 and 0.0 <= ev["mAP"] <= 1.0
    assert ev["attention_stats"]["num_images"] > 0  # per-head attention: eval.json's head statistics


def test_the_toy_exports_to_onnx_and_matches_pytorch(toy_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from attnreid.engine.build import load_model
    from attnreid.inference.export import export_onnx

    run, _ = toy_run
    model, cfg = load_model(run / "checkpoints" / "last.pth")
    report = export_onnx(model, tmp_path / "toy.onnx", (cfg.data.height, cfg.data.width), attention=True)
    assert report["model"] == "toy" and report["outputs"] == ["feature", "attention"]
    assert report["rel_diff"] < 1e-4


def test_the_toy_is_in_the_report_with_its_attention(toy_run, tmp_path):
    from attnreid.viz.report import write_report

    run, _ = toy_run
    page = write_report([run], tmp_path / "report", overlays=1).read_text()
    assert "toy" in page and "One panel per head" in page  # the "heads" legend, from the toy's entry
    assert list((tmp_path / "report" / "report_files").glob("*attention_*.png"))


def test_model_info_reads_the_entry(toy, synthetic_root):
    from attnreid.cli.model import model_info

    info = model_info(toy_cfg(synthetic_root), num_classes=5)
    assert info["model"] == "toy" and info["backbone"] is None and info["attention_grid"] == [16, 8]


def test_the_design_doc_shows_the_toy_as_it_is():
    doc = (ROOT / "docs" / "design.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert (Path(__file__).parent / "toy_model.py").read_text() in blocks


SMALL = {"baseline": ["model.bnneck=true"],
         "mhsanet": ["model.bnneck=true", "model.mhsanet.num_heads=2", "model.mhsanet.attention_dim=16",
                     "model.mhsanet.embed_dim=16"],
         "hacnn": ["model.hacnn.widths=[8,16,24]", "model.hacnn.embed_dim=16"]}


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_entry_fits_its_network(name):
    """The training output is a TrainOutput, every loss term the entry names reads an entry the
    output has, and the capabilities hold: attention maps of the declared kind, and "heads"
    models return alpha (the head diagnostics read it)."""
    import torch

    from attnreid.models import build_model
    from attnreid.models.output import TrainOutput

    cfg = load_config(None, [f"model.name={name}", "model.backbone.name=mobilenetv3_small", "data.height=64",
                             "data.width=32", *SMALL[name]])
    spec = get_spec(name)
    torch.manual_seed(0)
    model = build_model(cfg.model, 4).train()
    out = model(torch.randn(4, 3, 64, 32))
    assert TrainOutput.__required_keys__ <= set(out) <= TrainOutput.__required_keys__ | TrainOutput.__optional_keys__
    reads = {"ce": lambda t: out["logits"][t.head], "triplet": lambda t: out["features"][t.head],
             "center": lambda t: out["features"][t.head], "fdrt": lambda t: out["P"], "ihtl": lambda t: out["P"],
             "acm": lambda t: out["alpha"], "attn_orth": lambda t: out["alpha"]}
    terms = spec.loss_terms(cfg.model)
    assert {t.kind for t in terms} <= set(reads) and len({t.name for t in terms}) == len(terms)
    for term in terms:
        assert isinstance(reads[term.kind](term), torch.Tensor), term
    assert ("alpha" in out) == spec.head_diagnostics
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 32)).shape == (2, model.feature_dim)
        if spec.attention is None:
            with pytest.raises(Exception, match="no attention maps"):
                model.forward_attention(torch.randn(2, 3, 64, 32))
        else:
            maps = model.forward_attention(torch.randn(2, 3, 64, 32))
            assert ("attention" if spec.attention == "heads" else "soft_attention") in maps


def test_built_in_entries():
    for name in BUILT_IN:
        spec = get_spec(name)
        assert spec.name == name and spec.builder().__module__ == f"attnreid.models.{name}"
    assert [get_spec(n).default_test_feature for n in BUILT_IN] == ["global", "concat", "joint"]
    with pytest.raises(ConfigError, match="config key 'model.name' is 'resnet'; expected one of: baseline"):
        get_spec("resnet")


# -- nothing outside a model's own file and the registry compares a model's name ------------------

def _names_in(node: ast.AST, names: set) -> list:
    if isinstance(node, ast.Constant) and node.value in names:
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [x for elt in node.elts for x in _names_in(elt, names)]
    return []


def name_comparisons(source: str, names: set) -> list:
    """(line, name) of every comparison (``==``, ``!=``, ``in``, ``not in``, a ``match`` case)
    with a literal model name, or a tuple, list or set holding one, in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, n) for n in _names_in(operand, names)]
        elif isinstance(node, ast.MatchValue):
            found += [(node.lineno, n) for n in _names_in(node.value, names)]
    return found


def test_the_check_sees_each_form_of_comparison():
    src = ('a == "mhsanet"\nb != "baseline"\nc in ("x", "mhsanet")\n"baseline" not in d\n'
           'match e:\n    case "mhsanet":\n        pass\nf = {"mhsanet": 1}\ng = h["baseline"]\n')
    assert name_comparisons(src, {"mhsanet", "baseline"}) == [(1, "mhsanet"), (2, "baseline"), (3, "mhsanet"),
                                                              (4, "baseline"), (6, "mhsanet")]


def test_no_model_name_comparison_outside_the_models_own_files():
    allowed = {SRC / "models" / "registry.py", *(SRC / "models" / f"{name}.py" for name in BUILT_IN)}
    bad = [f"{path.relative_to(SRC)}:{line}: {name!r}"
           for path in sorted(SRC.rglob("*.py")) if path not in allowed
           for line, name in name_comparisons(path.read_text(), set(BUILT_IN))]
    assert not bad, "compares a model name; read the model's registry entry instead: " + ", ".join(bad)
