"""Cross-domain evaluation (train on A, test on B) through the documented single-target route:
``eval.dataset`` / ``eval.root`` (docs/data.md, "Cross-domain evaluation")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from helpers import run_cli
from test_train_cli import TINY


def _duke_from(market: Path, root: Path, num_query: int) -> Path:
    """A DukeMTMC-reID layout holding the synthetic gallery and the first ``num_query`` queries."""
    base = root / "DukeMTMC-reID"
    for folder in ("bounding_box_train", "bounding_box_test"):
        shutil.copytree(market / folder, base / folder)
    (base / "query").mkdir()
    for f in sorted((market / "query").iterdir())[:num_query]:
        shutil.copy(f, base / "query" / f.name)
    return root


def _partial_reid_from(market: Path, root: Path) -> Path:
    """Partial-REID names (``<pid>_<n>.jpg``) for some synthetic queries and gallery images."""
    base = root / "Partial-REID_Dataset"
    for split, folder in (("query", "partial_body_images"), ("bounding_box_test", "whole_body_images")):
        (base / folder).mkdir(parents=True)
        for n, f in enumerate(sorted((market / split).iterdir())[:12]):
            pid = int(f.name.split("_")[0])
            if pid > 0:
                shutil.copy(f, base / folder / f"{pid:03d}_{n:02d}.jpg")
    return root


def test_train_on_market_evaluate_on_duke_then_on_partial_reid(synthetic_root, tmp_path):
    market = Path(synthetic_root) / "market1501"
    duke = _duke_from(market, tmp_path / "duke_root", num_query=5)
    partial = _partial_reid_from(market, tmp_path / "partial_root")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(dict(TINY, data=dict(TINY["data"], root=str(synthetic_root)))))

    # one command: train on Market (A), evaluate on DukeMTMC-reID (B)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", config, "eval.dataset=dukemtmcreid", f"eval.root={duke}", "--out", run])
    assert code == 0, err
    result = json.loads((run / "eval.json").read_text())
    assert result["dataset"] == "dukemtmcreid" and result["num_query"] == 5
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["dataset"] == "market1501" and saved["eval"]["dataset"] == "dukemtmcreid"

    # the same checkpoint on another target, Partial-REID (the partial protocol: Rank-1 / Rank-3)
    code, out, err = run_cli(["eval", config, "eval.dataset=partial_reid", f"eval.root={partial}",
                              "--checkpoint", run / "checkpoints" / "last.pth", "--json"])
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["dataset"] == "partial_reid" and metrics["protocol"] == "partial"
    assert metrics["num_query"] == len(list((partial / "Partial-REID_Dataset" / "partial_body_images").iterdir()))
    assert 0.0 <= metrics["rank1"] <= metrics["rank3"] <= 1.0
