"""Imports go one way: the layer table of docs/design.md, enforced on src/attnreid's import graph.

The table is read from docs/design.md ("Layers"), so the page and the check cannot drift
apart. Every import counts, at module level or inside a function (via ``ast``), as does an
``importlib.import_module("attnreid...")`` with a literal name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "attnreid"
DESIGN = ROOT / "docs" / "design.md"
# (importer, imported) pairs the page names as exceptions, with why.
EXCEPTIONS = {
    ("attnreid", "attnreid.deploy.extractor"),  # `from attnreid import FeatureExtractor`, imported on first use
}
# Who may read the config, and what of models it reads.
CONFIG_READERS = {"engine", "apps", "cli", "config"}
CONFIG_MODELS = {"attnreid.models", "attnreid.models.registry"}


def layer_table(text: str) -> Dict[str, int]:
    """package -> layer number, from the rows ``| N | `pkg`, `pkg` | ... |`` of the "Layers" table."""
    table: Dict[str, int] = {}
    for number, packages in re.findall(r"^\| (\d+) \| ([^|]+) \|", text, re.M):
        for name in re.findall(r"`([\w.]+)`", packages):
            table[name] = int(number)
    return table


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """``attnreid.engine.trainer`` -> ``engine``; the root package is ``attnreid``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "attnreid"


def imports(source: str, module: str, is_package: bool) -> Iterator[Tuple[int, str]]:
    """(line, imported attnreid module) for every import in ``source``, at any depth."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parent + ([base] if base else []))
            # `from attnreid import choices` imports the submodule, `from attnreid import __version__` the root
            names = [f"{base}.{a.name}" if (SRC.parent / base.replace(".", "/") / a.name).with_suffix(".py").is_file()
                     or (SRC.parent / base.replace(".", "/") / a.name).is_dir() else base for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            if name == "attnreid" or name.startswith("attnreid."):
                yield node.lineno, name


def violations(graph: Dict[str, List[Tuple[int, str]]], table: Dict[str, int]) -> List[str]:
    bad = []
    for module, targets in graph.items():
        src = package_of(module)
        for line, target in targets:
            dst = package_of(target)
            if src == dst or (module, target) in EXCEPTIONS:
                continue
            where = f"{module}:{line} imports {target}"
            if dst not in table or src not in table:
                bad.append(f"{where}: package {dst if dst not in table else src!r} is not in the layer table")
            elif table[dst] > table[src]:
                bad.append(f"{where}: layer {table[src]} ({src}) imports layer {table[dst]} ({dst})")
            elif table[dst] == table[src]:
                bad.append(f"{where}: {src} and {dst} share layer {table[src]} and must not import each other")
            elif dst == "config" and src not in CONFIG_READERS:
                bad.append(f"{where}: only {', '.join(sorted(CONFIG_READERS - {'config'}))} read the config")
            elif src == "config" and dst == "models" and target not in CONFIG_MODELS:
                bad.append(f"{where}: the config reads only the torch-free models.registry")
    return bad


def import_graph() -> Dict[str, List[Tuple[int, str]]]:
    return {module_name(path): list(imports(path.read_text(), module_name(path), path.name == "__init__.py"))
            for path in sorted(SRC.rglob("*.py"))}


@pytest.fixture(scope="module")
def table() -> Dict[str, int]:
    return layer_table(DESIGN.read_text())


def test_the_table_names_every_package(table):
    packages: Set[str] = {package_of(module_name(p)) for p in SRC.rglob("*.py")}
    assert packages <= set(table), f"not in docs/design.md's layer table: {sorted(packages - set(table))}"
    assert table["errors"] < table["choices"] < table["models"] < table["losses"] < table["inference"] \
        < table["engine"] < table["deploy"] < table["apps"] < table["cli"]


def test_no_import_goes_against_the_layers(table):
    bad = violations(import_graph(), table)
    assert not bad, "import(s) against docs/design.md's layers:\n" + "\n".join(bad)


def test_the_check_catches_each_kind_of_back_arrow(table):
    def graph_of(module: str, source: str) -> Dict[str, List[Tuple[int, str]]]:
        return {module: list(imports(source, module, False))}

    cases = {
        ("attnreid.models.toy", "def f():\n    from attnreid.losses import build_criterion\n"): "imports layer",
        ("attnreid.engine.x", "import attnreid.deploy.index\n"): "imports layer",
        ("attnreid.data.x", "from attnreid.evaluation import rank\n"): "share layer",
        ("attnreid.deploy.x", "from attnreid import config\n"): "read the config",
        ("attnreid.config", "from attnreid.models.mhsanet import MHSANet\n"): "models.registry",
        ("attnreid.inference.x", "import importlib\nimportlib.import_module('attnreid.engine.build')\n"):
            "imports layer",
        ("attnreid.models.x", "from ..engine import build\n"): "imports layer",
    }
    for (module, source), needle in cases.items():
        bad = violations(graph_of(module, source), table)
        assert len(bad) == 1 and needle in bad[0], (module, source, bad)
    allowed = graph_of("attnreid.engine.x", "from attnreid.models import build_model\nfrom attnreid import errors\n")
    assert violations(allowed, table) == []


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other():
    """Within a package too (the table only orders packages): no cycle of modules, at any depth."""
    graph = import_graph()
    modules = set(graph)

    def nearest(target: str) -> str:  # `from attnreid.models import build_model` is the package module
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        return target

    edges = {m: {nearest(t) for _, t in targets} - {m} for m, targets in graph.items()}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not cycles(edges), f"modules that import each other: {cycles(edges)}"
