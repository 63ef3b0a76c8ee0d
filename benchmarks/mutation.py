"""Mutation testing in bounded time: mutmut over models/, losses/, evaluation/ and data/sampler.py.

    .venv/bin/python benchmarks/mutation.py named                  # issue 14's named mutations
    .venv/bin/python benchmarks/mutation.py mutmut --sample 40     # a seeded sample per package
    .venv/bin/python benchmarks/mutation.py mutmut --ref 4819532   # the same on an older commit
    .venv/bin/python benchmarks/mutation.py mutmut --names-from benchmarks/results/mutation_before.json
                                                                   # re-check those survivors here

``named`` applies each hand-written mutation below (a paper equation, a protocol, or which
tensor a loss acts on) to a temporary copy of ``src/`` and runs the one test that must catch
it: every one must be killed. Writes ``benchmarks/results/mutation_named.json``.

``mutmut`` runs mutmut 3 once per package in a temporary work tree (``src/``, ``tests/`` and a
generated ``[tool.mutmut]`` of that package's files and test subset), so the repository's own
tree is never touched. A full run is thousands of mutants times a test subset each: impossible
on a shared 2-core machine, so the run is bounded by ``--sample`` (mutants per package, drawn
with ``--seed`` from all that mutmut generates), ``--budget-s`` (wall-clock seconds per
package; mutants not reached count as not covered) and mutmut's own per-mutant CPU-time
limit. Each package reports mutants generated, sampled, checked, killed (including
timeouts), survived, and the score = killed / checked. The surviving mutants' diffs go to
``benchmarks/results/mutation_survivors_<label>.txt`` for review. Writes
``benchmarks/results/mutation_<label>.json`` (label: ``--label``, default the commit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(REPO / "src"))

# package -> (files mutmut mutates, the tests that exercise them)
PACKAGES = {
    "models": (["src/attnreid/models/*.py"],
               ["tests/test_hacnn.py", "tests/test_mhsanet.py", "tests/test_backbones.py",
                "tests/test_paper_mutations.py"]),
    "losses": (["src/attnreid/losses/*.py"],
               ["tests/test_losses.py", "tests/test_mhsanet.py", "tests/test_paper_mutations.py",
                "tests/test_loss_edges.py"]),
    "evaluation": (["src/attnreid/evaluation/*.py"],
                   ["tests/test_evaluation_rank.py", "tests/test_evaluation_rerank.py",
                    "tests/test_evaluation_properties.py"]),
    "sampler": (["src/attnreid/data/sampler.py"], ["tests/test_data_pipeline.py", "tests/test_training_modes.py"]),
}

# The mutations issue 14 names, each with the test that kills it: (id, what, file, old, new, test).
NAMED = [
    ("hacnn-eq6-crop-only", "HA Eq. 6: the stream input `local + crop` replaced by `crop`",
     "src/attnreid/models/hacnn.py",
     "local_in = crop if local is None else cross_attention_interaction(local, crop)", "local_in = crop",
     "tests/test_paper_mutations.py::test_ha_eq6_stream_input_is_stream_feature_plus_global_crop"),
    ("hacnn-eq6-add-dropped", "HA Eq. 6: cross_attention_interaction returns the crop alone",
     "src/attnreid/models/hacnn.py", "    return local + global_crop", "    return global_crop",
     "tests/test_paper_mutations.py::test_ha_eq6_stream_input_is_stream_feature_plus_global_crop"),
    ("hacnn-eq7-detach", "HA Eq. 7: the global map cropped at levels 2-3 detached",
     "src/attnreid/models/hacnn.py",
     "crop = sample_regions(level_input, theta, REGION_SIZES[level])",
     "crop = sample_regions(level_input if level == 0 else level_input.detach(), theta, REGION_SIZES[level])",
     "tests/test_paper_mutations.py::test_ha_eq7_local_loss_reaches_global_levels_through_the_crops_themselves"),
    ("gfb-maxpool", "Global Feature Branch: max-pool instead of GAP",
     "src/attnreid/models/baseline.py", "F.adaptive_avg_pool2d(feature_map, 1)",
     "F.adaptive_max_pool2d(feature_map, 1)",
     "tests/test_paper_mutations.py::test_global_feature_branch_is_gap_conv_bn_relu_by_hand"),
    ("gfb-no-relu", "Global Feature Branch: no ReLU after the BN",
     "src/attnreid/models/baseline.py", "            nn.BatchNorm2d(embed_dim),\n            nn.ReLU(inplace=True),\n",
     "            nn.BatchNorm2d(embed_dim),\n",
     "tests/test_paper_mutations.py::test_global_feature_branch_is_gap_conv_bn_relu_by_hand"),
    ("mhsa-triplets-on-qstar-model", "MHSA-Net: both batch-hard triplets' inputs are q* (model)",
     "src/attnreid/models/mhsanet.py",
     '"features": {"saffm": p_star},', '"features": {"saffm": q_star, "rlm": q_star},',
     "tests/test_paper_mutations.py::test_triplet_inputs_are_p_star_and_z_of_the_model"),
    ("mhsa-triplets-on-qstar-loss", "MHSA-Net: both batch-hard triplets act on q* (criterion)",
     "src/attnreid/losses/__init__.py", 'out["features"][head]', 'out["q_star"]',
     "tests/test_paper_mutations.py::test_batch_hard_triplets_act_on_p_star_and_z_never_on_q_star"),
]


def machine() -> dict:
    sys.path.insert(0, str(HERE))
    from _machine import machine_record  # noqa: E402

    return machine_record()


def export_tree(ref: str | None, dest: Path) -> str:
    """src/, tests/, configs/, pyproject.toml of the working tree (ref None) or of commit ``ref`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    if ref is None:
        for name in ("src", "tests", "configs"):
            shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() + "+worktree"
    archive = subprocess.run(["git", "archive", ref, "src", "tests", "configs", "pyproject.toml"], cwd=REPO,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def _env(src: Path) -> dict:
    # One intra-op thread: forked mutmut workers and a shared machine; float results do not change.
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_named(args) -> dict:
    rows, clean_rc = [], {}
    with tempfile.TemporaryDirectory(prefix="attnreid-named-") as tmp:
        clean = Path(tmp) / "clean"
        export_tree(None, clean)
        for mid, what, path, old, new, test in NAMED:
            work = Path(tmp) / mid
            shutil.copytree(clean, work)
            text = (work / path).read_text()
            if text.count(old) != 1:
                rows.append({"id": mid, "what": what, "test": test, "status": "not applicable (source changed)"})
                continue
            (work / path).write_text(text.replace(old, new))
            cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", test]
            if test not in clean_rc:  # the test must pass on the unmutated tree for a kill to mean anything
                clean_rc[test] = subprocess.run(cmd, cwd=clean, env=_env(clean / "src"),
                                                capture_output=True).returncode
            rc = subprocess.run(cmd, cwd=work, env=_env(work / "src"), capture_output=True).returncode
            status = ("killed" if (clean_rc[test] == 0 and rc == 1)
                      else f"NOT KILLED (clean rc {clean_rc[test]}, mutant rc {rc})")
            rows.append({"id": mid, "what": what, "test": test, "status": status})
            print(f"{status:10s} {mid}: {test}", flush=True)
            shutil.rmtree(work)
    return {"named_mutations": rows, "all_killed": all(r["status"] == "killed" for r in rows)}


def _pyproject(files, tests) -> str:
    toml_list = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # noqa: E731
    return ("[tool.mutmut]\n"
            'source_paths = ["src"]\n'
            'also_copy = ["configs"]\n'
            f"only_mutate = {toml_list(files)}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
            'pytest_add_cli_args = ["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]\n'
            "timeout_multiplier = 5.0\n"
            "use_git_change_detection = false\n")


def _results(work: Path) -> dict:
    """mutant name -> mutmut exit code (None: not checked), read from mutmut's .meta files."""
    out = {}
    for meta in (work / "mutants").rglob("*.meta"):
        out.update(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    return out


def _mutmut(work: Path, names, budget_s: float, workers: int) -> None:
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(workers), *names]
    log = open(work / "mutmut.log", "ab")
    proc = subprocess.Popen(cmd, cwd=work, env=_env(work / "mutants" / "src"), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()


KILLED = {1, 3, 24, -24, 36, 152, 255}  # mutmut: failed test, pytest error, CPU-time limit


def run_package(package: str, ref: str | None, sample: int, seed: int, budget_s: float, workers: int,
                survivors_out, names=None) -> dict:
    files, tests = PACKAGES[package]
    with tempfile.TemporaryDirectory(prefix=f"attnreid-mutmut-{package}-") as tmp:
        work = Path(tmp)
        commit = export_tree(ref, work)
        tests = [t for t in tests if (work / t).exists()]
        (work / "pyproject.toml").write_text(_pyproject(files, tests))
        start = time.time()
        # Pass 1 generates every mutant and maps tests to functions, checking none (no name matches).
        _mutmut(work, ["no-such-mutant-*"], budget_s, workers)
        generated = sorted(_results(work))
        if names is not None:  # the same mutants as an earlier run, where they still exist
            chosen = sorted(set(names) & set(generated))
        else:
            rng = random.Random(f"{seed}-{package}")
            chosen = sorted(rng.sample(generated, min(sample, len(generated)))) if sample else generated
        left = budget_s - (time.time() - start)
        if chosen and left > 0:
            _mutmut(work, chosen, left, workers)
        codes = _results(work)
        checked = {n: codes.get(n) for n in chosen if codes.get(n) not in (None, 2)}
        killed = [n for n, c in checked.items() if c in KILLED]
        no_tests = [n for n, c in checked.items() if c in (5, 33)]
        survived = [n for n, c in checked.items() if c == 0]
        for name in survived:
            diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work,
                                  env=_env(work / "mutants" / "src"), capture_output=True, text=True).stdout
            survivors_out.write(f"### {package}: {name}\n{diff}\n")
        scored = len(checked) - len(no_tests)
        # nothing checked: mutmut stopped early (its clean test run failed, say): say why
        error = None if checked or not chosen else (work / "mutmut.log").read_text(errors="replace")[-2000:]
        return {
            "package": package, "commit": commit, "files": files, "tests": tests,
            "generated": len(generated), "sampled": len(chosen), "checked": len(checked),
            "killed": len(killed), "survived": len(survived), "no_tests": len(no_tests),
            "score": round(len(killed) / scored, 3) if scored else None,
            "sampled_names": chosen, "survivors": survived, "wall_s": round(time.time() - start, 1),
            "error": error,
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("named", help="the issue's named mutations, each against its test")
    mm = sub.add_parser("mutmut", help="mutmut on a seeded sample per package")
    mm.add_argument("--packages", nargs="+", default=list(PACKAGES), choices=list(PACKAGES))
    mm.add_argument("--sample", type=int, default=40, help="mutants per package (0 = all)")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--budget-s", type=float, default=900, help="wall-clock seconds per package")
    mm.add_argument("--workers", type=int, default=2)
    mm.add_argument("--ref", default=None, help="git commit to test instead of the working tree")
    mm.add_argument("--label", default=None)
    mm.add_argument("--names-from", default=None, metavar="JSON",
                    help="re-check an earlier result's survivors (its 'survivors' per package) instead of sampling")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    if args.mode == "named":
        result = {"machine": machine(), **run_named(args)}
        (RESULTS / "mutation_named.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0 if result["all_killed"] else 1
    label = args.label or (args.ref or "worktree")
    earlier = None
    if args.names_from:
        earlier = {r["package"]: r["survivors"] for r in json.loads(Path(args.names_from).read_text())["packages"]}
    rows = []
    with open(RESULTS / f"mutation_survivors_{label}.txt", "w") as survivors:
        for package in args.packages:
            names = None if earlier is None else earlier.get(package, [])
            row = run_package(package, args.ref, args.sample, args.seed, args.budget_s, args.workers, survivors,
                              names)
            rows.append(row)
            print(f"{package:11s} score {row['score']}  killed {row['killed']}/{row['checked'] - row['no_tests']}"
                  f"  (sampled {row['sampled']} of {row['generated']}, {row['wall_s']} s)", flush=True)
    result = {"machine": machine(), "label": label, "names_from": args.names_from, "sample": args.sample,
              "seed": args.seed,
              "budget_s": args.budget_s, "workers": args.workers, "packages": rows}
    (RESULTS / f"mutation_{label}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
