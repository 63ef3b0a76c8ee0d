"""Executable docs: every command block and Python block of README.md and docs/*.md runs here,
on the synthetic set, or says why it cannot (docs/testing.md, "Executable docs").

A block runs as written unless an HTML comment right above its fence says otherwise:

- ``<!-- docs-test: skip (REASON) -->``: not run (real data, a GPU, a long run); its ``attnreid``
  commands are still checked against the CLI (the subcommand and every option exist), the
  files of ``python path.py`` / ``pytest tests/x.py`` exist and Python is compiled;
- ``<!-- docs-test: tiny -->``: run with :data:`TINY` appended to every ``attnreid`` command that
  reads a config: the synthetic data root, a small backbone, one epoch of two steps;
- ``<!-- docs-test: output -->``: a ``$ command`` transcript whose printed lines must be the
  ones shown.

The blocks of one page run in order in one folder (a copy of :func:`playground`), Python
blocks in one namespace, so a block may use what an earlier one wrote or defined.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "configs" / "README.md"]
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
SHELL = ("bash", "sh", "shell", "console")
DIRECTIVES = ("skip", "tiny", "output")
# Commands that read a model's config: `tiny` appends its overrides to them.
CONFIG_COMMANDS = ("train", "eval", "extract", "export", "robustness", "explain", "model-info", "index build")
SHELL_SYNTAX = re.compile(r"[|;&<>`]|\$\(|\$\{|\$[A-Za-z_]")

# The data root and size a `tiny` block runs at (`data.root` is filled in by the test).
TINY = ["data.dataset=market1501", "data.height=64", "data.width=32", "data.batch_size=8", "data.num_instances=2",
        "data.test_batch_size=32", "data.workers=0", "data.val_ids=0", "model.backbone.name=mobilenetv3_small",
        "model.backbone.pretrained=false", "model.backbone.weights=null", "model.mhsanet.num_heads=2",
        "model.hacnn.widths=[16,32,48]", "model.hacnn.embed_dim=128", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.eval_every=0", "train.device=cpu", "train.threads=1",
        "eval.dataset=", "eval.root=", "eval.datasets=[]",
        # float32: what a docs example shows must not hang on a CPU's bf16 kernels (issue 25)
        "train.amp=off", "eval.amp=off"]


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    directive: str = ""  # "", skip, tiny or output
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"

    @property
    def kind(self) -> str:
        """python, shell (commands) or text (a listing, an output, a layout)."""
        if self.lang in ("python", "py"):
            return "python"
        if self.lang in SHELL or any(line.startswith("$ ") for line in self.text.splitlines()):
            return "shell"
        return "text"


def extract_blocks(path: Path) -> List[Block]:
    """The fenced blocks of a Markdown file, each with the directive of the comment above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).lower()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.relative_to(REPO)}:{i + 1}: code block never closed")
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
        above = i - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        marker = MARKER.match(lines[above]) if above >= 0 else None
        block = Block(path, i + 1, lang, body)
        if marker:
            block.directive, block.reason = marker.group(1), marker.group(2).strip()
        blocks.append(block)
        i = end + 1
    return blocks


def all_blocks() -> List[Block]:
    return [b for doc in DOCS if doc.is_file() for b in extract_blocks(doc)]


def commands(block: Block) -> List[Tuple[str, Optional[List[str]]]]:
    """The shell commands of a block, ``\\``-continued lines joined, with the output lines a
    ``$`` transcript shows after each (None for a plain script)."""
    lines = block.text.splitlines()
    transcript = any(line.startswith("$ ") for line in lines)
    out: List[Tuple[str, Optional[List[str]]]] = []
    pending = ""
    for line in lines:
        if transcript and not line.startswith("$ ") and not pending:
            if out:
                out[-1][1].append(line.rstrip())
            continue
        text = line[2:] if transcript and line.startswith("$ ") else line
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        text = (pending + text).strip()
        pending = ""
        if text and not text.startswith("#"):
            out.append((text, [] if transcript else None))
    return out


def _split(command: str) -> List[str]:
    return shlex.split(command, comments=True)


def _attnreid_args(tokens: List[str]) -> Optional[List[str]]:
    """The arguments after ``attnreid`` (also ``python -m attnreid``, ``torchrun ... -m attnreid``)."""
    if tokens and tokens[0] == "attnreid":
        return tokens[1:]
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "attnreid":
            return tokens[i + 2:]
    return None


# -- the rules every block follows -------------------------------------------------------------

def test_every_block_is_found_and_marked_well():
    blocks = all_blocks()
    assert len(blocks) > 30, "the extractor found too few blocks: is the fence pattern right?"
    problems = []
    for b in blocks:
        if b.directive and b.directive not in DIRECTIVES:
            problems.append(f"{b.where}: unknown docs-test directive {b.directive!r} (expected {DIRECTIVES})")
        if b.directive == "skip" and not re.fullmatch(r"\(.+\)", b.reason):
            problems.append(f"{b.where}: 'docs-test: skip' needs its reason in parentheses")
        if b.directive in ("tiny", "output") and b.kind != "shell":
            problems.append(f"{b.where}: 'docs-test: {b.directive}' is for command blocks")
        if b.directive == "output" and not any(line.startswith("$ ") for line in b.text.splitlines()):
            problems.append(f"{b.where}: 'docs-test: output' needs a $ transcript")
        looks_like_commands = any(re.match(r"(attnreid|python|pip|torchrun)\b", line.strip())
                                  for line in b.text.splitlines())
        if b.kind == "text" and looks_like_commands:
            problems.append(f"{b.where}: commands in a block that is neither ```bash nor a $ transcript")
    assert not problems, "\n".join(problems)


def test_extractor_on_a_made_up_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- docs-test: skip (needs Market-1501) -->\n\n```bash\n"
                    "attnreid eval runs/x \\\n    --json   # a comment\n# only a comment\n```\n\n"
                    "```\n$ attnreid model-info c.yaml\nmodel  x\n$ attnreid version\n```\n"
                    "  ```python\n  x = 1\n  ```\n")
    skip, transcript, python = extract_blocks(page)
    assert (skip.directive, skip.reason, skip.kind, skip.line) == ("skip", "(needs Market-1501)", "shell", 5)
    assert commands(skip) == [("attnreid eval runs/x      --json   # a comment", None)]
    assert transcript.kind == "shell" and transcript.directive == ""
    assert commands(transcript) == [("attnreid model-info c.yaml", ["model  x"]), ("attnreid version", [])]
    assert python.kind == "python" and python.text == "x = 1"


# -- skipped blocks: still checked against the code -------------------------------------------

def _click_root():
    import typer

    from attnreid.cli import app, load_commands

    load_commands(["--help"])  # the command modules are imported lazily: register them all

    return typer.main.get_command(app)


def check_command(tokens: List[str]) -> List[str]:
    """Problems of one written command: an attnreid subcommand or option that does not exist,
    a script or test file that is not in the repository."""
    problems = []
    args = _attnreid_args(tokens)
    if args is not None:
        cmd, path = _click_root(), ["attnreid"]
        while args and hasattr(cmd, "commands") and args[0] in cmd.commands:
            cmd = cmd.commands[args[0]]
            path.append(args.pop(0))
        if hasattr(cmd, "commands"):
            return [f"'{' '.join(path + args[:1])}' is not an attnreid command"]
        options = {"--help", "-h"} | {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}
        for token in args:
            name = token.strip("[]").split("=", 1)[0]
            if re.match(r"--?[A-Za-z]", name) and name not in options:
                problems.append(f"'{' '.join(path)}' has no option {name}")
    for token in tokens:
        if re.match(r"(\.?/)?(benchmarks|tests)/[\w/.-]+\.py(::\w+)?$", token):
            file = token.split("::")[0]
            if not (REPO / file).is_file():
                problems.append(f"{file} is not in the repository")
    return problems


SKIPPED = [b for b in all_blocks() if b.directive == "skip" and b.kind in ("shell", "python")]


@pytest.mark.parametrize("block", SKIPPED, ids=[b.where for b in SKIPPED])
def test_skipped_block_still_fits_the_code(block):
    if block.kind == "python":
        compile(block.text, block.where, "exec")
        return
    problems = []
    for command, _ in commands(block):
        for part in re.split(r"\s*(?:&&|\|\||;|\|)\s*", command):  # each command of a `a && b | c` line
            problems += check_command(_split(part)) if part.strip() else []
    assert not problems, f"{block.where}: " + "; ".join(problems)


def test_check_command_finds_what_is_gone():
    assert check_command(_split("attnreid eval RUN --rerank --json")) == []
    assert check_command(_split("attnreid index build DIR --checkpoint C --out I")) == []
    assert check_command(_split("attnreid evaluate RUN")) == ["'attnreid evaluate' is not an attnreid command"]
    assert check_command(_split("attnreid eval RUN --re-rank")) == ["'attnreid eval' has no option --re-rank"]
    assert check_command(_split("torchrun --nproc_per_node 4 -m attnreid train C --out R")) == []
    assert check_command(_split("python benchmarks/no_such_bench.py")) == [
        "benchmarks/no_such_bench.py is not in the repository"]


# -- runnable blocks: run on the synthetic set --------------------------------------------------

@pytest.fixture(scope="module")
def playground(synthetic_root, tmp_path_factory):
    """What the runnable examples may use, as a folder the pages run in (docs/testing.md):
    ``configs/`` (the repository's), ``data/`` (a data root holding the synthetic set in the
    Market layout), ``runs/baseline``, ``runs/mhsanet``, ``runs/hacnn`` (tiny models trained
    on it), ``feats.npz`` (``attnreid extract runs/mhsanet --split query --split gallery``) and
    two query images ``a.jpg``, ``b.jpg``."""
    import torch

    from helpers import run_cli

    root = tmp_path_factory.mktemp("docs_playground")
    (root / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    shutil.copytree(synthetic_root, root / "data")
    tiny = TINY + [f"data.root={root / 'data'}"]
    threads = torch.get_num_threads()
    for name in ("baseline", "mhsanet", "hacnn"):
        config = root / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"model": {"name": name}}))
        code, _, err = run_cli(["train", config, *tiny, "--out", root / "runs" / name])
        assert code == 0, err
        config.unlink()
    code, _, err = run_cli(["extract", root / "runs" / "mhsanet", "--split", "query", "--split", "gallery",
                            "--out", root / "feats.npz"])
    assert code == 0, err
    queries = sorted((root / "data" / "market1501" / "query").glob("*.jpg"))
    shutil.copy(queries[0], root / "a.jpg")
    shutil.copy(queries[1], root / "b.jpg")
    torch.set_num_threads(threads)
    return root


def _page_folder(playground: Path, tmp_path: Path) -> Path:
    """A copy of the playground for one page: hard links (writes are atomic renames, so the
    shared files never change), the configs link kept as a link."""
    folder = tmp_path / "page"
    shutil.copytree(playground, folder, symlinks=True, copy_function=os.link)
    return folder


def _run_attnreid(args: List[str]) -> Tuple[int, str, str]:
    from attnreid.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def run_command(command: str, block: Block, folder: Path) -> Tuple[int, str, str]:
    """One command of a page, in ``folder``: attnreid in this process (fast), anything else in bash."""
    tokens = _split(command)
    args = _attnreid_args(tokens)
    code = re.sub(r"\s#.*$", "", command)  # the comment may say anything
    if args is None or SHELL_SYNTAX.search(code) or tokens[0] != "attnreid":
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout, proc.stderr
    expanded = []
    for token in args:  # the shell's globbing, relative to the page's folder
        matches = sorted(glob.glob(token, root_dir=folder)) if re.search(r"[*?[]", token) else []
        expanded += matches or [token]
    if block.directive == "tiny" and any(" ".join(expanded).startswith(c) for c in CONFIG_COMMANDS):
        expanded += TINY + [f"data.root={folder / 'data'}"]
    return _run_attnreid(expanded)


OPTIONAL = {"onnxruntime": r"attnreid export|onnxruntime", "faiss": r"faiss"}
RUNNABLE_DOCS = sorted({b.doc for b in all_blocks()
                        if b.kind in ("shell", "python") and b.directive != "skip"})


@pytest.mark.parametrize("doc", RUNNABLE_DOCS, ids=[str(d.relative_to(REPO)) for d in RUNNABLE_DOCS])
def test_page_runs_as_written(doc, playground, tmp_path, monkeypatch, one_thread):
    runnable = "\n".join(b.text for b in extract_blocks(doc) if b.directive != "skip")
    for module, used in OPTIONAL.items():  # the extras a page's examples need ([onnx], [faiss])
        if re.search(used, runnable):
            pytest.importorskip(module, reason=f"{doc.name}'s examples need {module}")
    folder = _page_folder(playground, tmp_path)
    monkeypatch.chdir(folder)
    namespace: dict = {"__name__": "__docs__"}
    for block in extract_blocks(doc):
        if block.directive == "skip" or block.kind == "text":
            continue
        if block.kind == "python":
            try:
                exec(compile(block.text, block.where, "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{block.where}: the Python block fails: {type(exc).__name__}: {exc}") from exc
            continue
        for command, shown in commands(block):
            code, out, err = run_command(command, block, folder)
            assert code == 0, f"{block.where}: `{command}` exited {code}:\n{err[-3000:]}"
            if block.directive == "output":
                printed = [line.rstrip() for line in out.strip("\n").splitlines()]
                assert printed == [line for line in shown if line], (
                    f"{block.where}: `{command}` printed\n" + "\n".join(printed))


# -- numbers the docs quote from a command --------------------------------------------------------

MODEL_TABLE = {  # docs/models.md's size table: its rows as model-info overrides of the paper config
    "baseline, ResNet-50": ["model.name=baseline"],
    "MHSA-Net K=8, ResNet-50": [],
    "MHSA-Net K=5, ResNet-50": ["model.mhsanet.num_heads=5"],
    "MHSA-Net K=8, fusion concat": ["model.mhsanet.fusion=concat"],
    "MHSA-Net K=8, w/o RLM": ["model.mhsanet.rlm=false"],
    "MHSA-Net K=8, ResNet-18": ["model.backbone.name=resnet18"],
    "MHSA-Net K=8, MobileNetV3-small": ["model.backbone.name=mobilenetv3_small"],
    "baseline, MobileNetV3-small": ["model.name=baseline", "model.backbone.name=mobilenetv3_small"],
}


def test_models_size_table_is_what_model_info_says():
    from attnreid.cli.model import model_info
    from attnreid.config import load_config

    text = (REPO / "docs" / "models.md").read_text()
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
        if line.startswith("| ") and line.strip().strip("|").split("|")[0].strip() in MODEL_TABLE)}
    assert set(rows) == set(MODEL_TABLE), "docs/models.md's size table and MODEL_TABLE list other rows"
    for label, overrides in MODEL_TABLE.items():
        info = model_info(load_config(REPO / "configs" / "mhsanet" / "market1501.yaml", overrides))
        got = [f"{info['params'] / 1e6:.2f} M", f"{info['params_no_classifier'] / 1e6:.2f} M",
               f"{info['macs'] / 1e9:.2f} G", str(info["feature_dim"])]
        assert rows[label] == got, f"docs/models.md, row {label!r}: model-info gives {got}"
