"""The README's ImageNet-on-a-CPU table is the one its benchmark prints from its result file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_readme_market_pretrained_table_comes_from_the_results():
    bench = _bench("bench_market_pretrained")
    result = json.loads((ROOT / "benchmarks" / "results" / "market_pretrained.json").read_text())
    readme = (ROOT / "README.md").read_text()
    table = bench.table(result)
    assert table.count("\n") >= 2, "the result file holds no recipe"
    assert table in readme, "README.md's table differs from bench_market_pretrained.py --table"
    occlusion = bench.robustness_table(result)
    assert occlusion in readme, "README.md's occlusion table differs from bench_market_pretrained.py --table"
