"""Mutation testing of the rules that define each method: `make mutants` (every module) or `make mutants
MODULE=masking` (one). Not part of `make test`: a full run takes about an hour on a 2-core machine.

mutmut 3 does the work: it writes every mutant of a module (an operator flipped, a constant changed, an argument
dropped) beside the source, runs the module's own fast tests once to learn which tests reach which function, then
runs, for each mutant, only those tests. A mutant the tests pass is a rule nothing pins. Each module runs in its own
copy of the project under `.mutmut/MODULE/` (each run starts afresh; `--keep` reuses the last results), with a `[tool.mutmut]` section written for that module alone: mutmut reads one configuration per folder,
and one module's test selection must not pay for another's.

Mutants that change nothing observable (equivalent mutants) are listed in `docs/mutation.md` with the reason; they
are counted apart. The script prints one table row per module (killed / non-equivalent mutants) and, with
`--write`, puts the table into docs/mutation.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "mutation.md"
MESSAGE_LINES = [r"^\s*raise ", r"^\s*(logger|logging)\.", r"^\s*warnings\.warn\(", r"^\s*print\("]
BEGIN, END = "<!-- mutants:begin -->", "<!-- mutants:end -->"
SKIPPED, UNCHECKED = 34, "unchecked.json"  # mutmut's exit code for a skipped mutant; the list kept during --survivors

# module name -> (the files mutated, the fast tests that pin their rules)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "objectives": (["retromae/objectives/*.py"],
                   ["tests/test_objective_rules.py", "tests/test_retromae_objective.py", "tests/test_more_objectives.py",
                    "tests/test_objective_family.py", "tests/test_lexmae.py", "tests/test_reference_choices.py"]),
    "masking": (["retromae/masking.py"], ["tests/test_masking.py", "tests/test_retromae_objective.py",
                                          "tests/test_more_objectives.py", "tests/test_objective_rules.py"]),
    "finetune-model": (["retromae/finetune/model.py"], ["tests/test_finetune.py", "tests/test_sparse.py",
                                                        "tests/test_more_objectives.py"]),
    "metrics": (["retromae/retrieval/metrics.py"], ["tests/test_metrics.py"]),
    "search": (["retromae/retrieval/search.py", "retromae/retrieval/index.py"],
               ["tests/test_index.py", "tests/test_scale.py", "tests/test_retrieval.py"]),
    "evaluate": (["retromae/retrieval/evaluate.py", "retromae/retrieval/hybrid.py"],
                 ["tests/test_retrieval.py", "tests/test_scale.py", "tests/test_more_objectives.py",
                  "tests/test_objective_family.py", "tests/test_sparse.py", "tests/test_inputs.py"]),
}


# objective files whose code also serves fine-tuning and search (DupMAE's representation: its export, the joint score)
ALSO_TESTED_BY = {"objectives/dupmae": ["tests/test_finetune.py", "tests/test_retrieval.py", "tests/test_index.py"]}


def selection(name: str) -> tuple[list[str], list[str]]:
    """A module's files and tests; `objectives/NAME` is one objective's file with the objectives' tests. Tests written
    from a module's survivors live in `tests/test_pinned_<module>.py` (`test_pinned_<objective>.py` for an objective's
    file, or `test_pinned_<module>_<part>.py`) and join its selection."""
    if name.startswith("objectives/"):
        files, tests = [f"retromae/{name}.py"], MODULES["objectives"][1] + ALSO_TESTED_BY.get(name, [])
    else:
        files, tests = MODULES[name]
    stem = name.split("/")[-1].replace("-", "_")
    pinned = sorted(ROOT.glob("tests/test_pinned_*.py")) if name == "objectives" else \
        [ROOT / f"tests/test_pinned_{stem}.py", *sorted(ROOT.glob(f"tests/test_pinned_{stem}_*.py"))]
    return files, tests + [str(p.relative_to(ROOT)) for p in pinned if p.is_file()]


def equivalent_mutants() -> dict[str, str]:
    """Mutant name -> why it changes nothing observable, read from docs/mutation.md's list ("- `name`: reason")."""
    if not DOC.exists():
        return {}
    return dict(re.findall(r"^- `([\w.]+__mutmut_\d+)`: (.+)$", DOC.read_text(encoding="utf-8"), re.M))


# tests left out of every selection: runs of many steps on a real corpus (each mutant they reach would pay for them;
# the rules they watch are pinned by the by-hand tests), and Seismic's (its Rust thread pool, started before mutmut
# forks a test process, deadlocks in the child), and the packaging's (it reads README.md, which the copy lacks)
SLOW_FOR_MUTANTS = ("not real_corpus and not pretrains_on_a_real_beir_corpus and not learns_and_exports "
                    "and not seismic and not sparse_encoder_agrees and not pyproject_licence")


def prepare_copy(name: str) -> Path:
    """`.mutmut/NAME/`: the library, the tests and a pyproject.toml whose [tool.mutmut] section selects this module."""
    files, tests = selection(name)
    work = ROOT / ".mutmut" / name.replace("/", "-")
    work.mkdir(parents=True, exist_ok=True)
    for folder in ("retromae", "tests"):  # copied afresh: a file removed from the project must not linger here
        shutil.rmtree(work / folder, ignore_errors=True)
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pytest_ini = project["tool"]["pytest"]["ini_options"]
    section = "\n".join([
        "[tool.pytest.ini_options]",
        f"markers = {json.dumps(pytest_ini['markers'])}",
        "",
        "[tool.mutmut]",
        'source_paths = ["retromae"]',
        f"only_mutate = {json.dumps(files)}",
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}",
        # the fast tests only: multi-process launches run the installed package, not the mutant
        'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider", "-x", "-q", "-k", '
        f'{json.dumps(SLOW_FOR_MUTANTS)}]',
        # the wording of errors, warnings and log lines is not a method's rule: those statements are left whole
        f"do_not_mutate_patterns = {json.dumps(MESSAGE_LINES)}",
        "",
    ])
    (work / "pyproject.toml").write_text(section, encoding="utf-8")
    return work


def reopen_survivors(work: Path, unchecked_too: bool = False) -> int:
    """Set every verdict of the last run but "killed" back to untested, and keep the rest: with tests only added since
    (a kill stays a kill), mutmut then collects the new tests' reach and re-tests the mutants that were not killed.
    mutmut would reset every verdict on a changed test selection; its configuration fingerprint is dropped for that
    reason (a function whose source changed is still re-tested whole: mutmut compares each function's hash).
    `unchecked_too`: the mutants a stopped run never reached are tested as well (else they are left for a full run)."""
    from mutmut.stats import status_by_exit_code

    stats = work / "mutants" / "mutmut-stats.json"
    if not stats.exists():
        raise SystemExit(f"{work}: no earlier run to take the survivors of (run the module without --survivors)")
    data = json.loads(stats.read_text(encoding="utf-8"))
    data.pop("config_fingerprint", None)
    stats.write_text(json.dumps(data), encoding="utf-8")
    reopened, unchecked = 0, []

    def reopen(codes: dict) -> None:
        nonlocal reopened
        for key, code in codes.items():
            if code is None and unchecked_too:
                reopened += 1
            elif code is None:  # a run stopped before it: no survivor; left for a full run (skipped now, restored after)
                codes[key] = SKIPPED
                unchecked.append(key)
            elif status_by_exit_code[code] != "killed":
                codes[key] = None
                reopened += 1

    edit_verdicts(work, reopen)
    (work / "mutants" / UNCHECKED).write_text(json.dumps(unchecked), encoding="utf-8")
    return reopened


def restore_unchecked(work: Path) -> None:
    """The mutants a stopped run never reached are "not checked" again after a `--survivors` run."""
    listed = work / "mutants" / UNCHECKED
    if not listed.exists():
        return
    unchecked = set(json.loads(listed.read_text(encoding="utf-8")))
    edit_verdicts(work, lambda codes: codes.update(
        {key: None for key in codes if key in unchecked and codes[key] == SKIPPED}))
    listed.unlink()


def edit_verdicts(work: Path, edit) -> None:
    """Apply `edit` to each mutated file's verdicts (mutant -> exit code) in mutmut's results files, each rewritten
    under a temporary name and renamed: a file rewritten in place and stopped half-way loses every verdict."""
    for meta_path in (work / "mutants").rglob("*.py.meta"):
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        edit(meta["exit_code_by_key"])
        tmp = meta_path.with_suffix(".meta.tmp")
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        tmp.replace(meta_path)


def run_module(name: str, max_children: int, keep: bool, recount: bool = False, survivors: bool = False,
               unchecked_too: bool = False) -> Counter:
    work = ROOT / ".mutmut" / name.replace("/", "-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    mutmut = Path(sys.executable).with_name("mutmut")
    if not recount:
        work = prepare_copy(name)
        if survivors:
            reopened = reopen_survivors(work, unchecked_too)
            print(f"{name}: {reopened} mutants not killed by the last run re-tested", flush=True)
        elif not keep:  # mutmut keeps results and its test mapping between runs; new tests would not reach old survivors
            shutil.rmtree(work / "mutants", ignore_errors=True)
        subprocess.run([str(mutmut), "run", "--max-children", str(max_children)], cwd=work, env=env, check=False)
        restore_unchecked(work)
    shown = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=work, env=env, capture_output=True,
                           text=True, check=True).stdout
    return tally(shown, equivalent_mutants())


def tally(results: str, equivalent: dict[str, str]) -> Counter:
    """Count `mutmut results --all true` lines ("    name: status"), equivalent mutants apart; survivors listed."""
    counts = Counter()
    for mutant, status in re.findall(r"^\s*([\w.]+__mutmut_\d+): (.+)$", results, re.M):
        if mutant in equivalent and status.strip() in ("killed", "timeout"):  # a name gone stale (its function changed)
            print(f"  listed as equivalent but killed (a stale entry in {DOC.name}): {mutant}")
        elif mutant in equivalent:
            counts["equivalent"] += 1
            continue
        counts[status.strip()] += 1
        if status.strip() not in ("killed", "not checked"):
            print(f"  {status.strip()}: {mutant}")
    return counts


def row(name: str, counts: Counter) -> str:
    """One table row: killed over the non-equivalent mutants (a timeout counts as killed, as mutmut counts it)."""
    killed = counts["killed"] + counts["timeout"]
    total = sum(v for k, v in counts.items() if k != "equivalent")
    checked = total - counts["not checked"]  # a run stopped part-way: the share of what it checked, said so
    share = killed / checked if checked else 0.0
    rest = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()) if k not in ("killed", "timeout", "equivalent"))
    partial = " of those checked" if counts["not checked"] else ""
    return (f"| {name} | {total + counts['equivalent']} | {counts['equivalent']} | {killed} / {checked} | "
            f"**{share:.1%}**{partial} | {rest or '-'} |")


def write_table(rows: dict[str, str]) -> None:
    """Replace the rows of the modules just run in docs/mutation.md's table, keeping the others."""
    text = DOC.read_text(encoding="utf-8")
    head, rest = text.split(BEGIN)
    table, tail = rest.split(END)
    kept = {line.split("|")[1].strip(): line for line in table.strip().splitlines()[2:]}
    kept.update(rows)
    lines = ["| module | mutants | equivalent | killed / non-equivalent | share | not killed |",
             "|---|---|---|---|---|---|"] + [kept[m] for m in sorted(kept, key=_order)]
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail, encoding="utf-8")
    tmp.replace(DOC)


def _order(name: str) -> tuple[int, str]:
    """Table order: the modules as listed, one objective's rows after the objectives' own."""
    base = name.split("/")[0]
    return (list(MODULES).index(base) if base in MODULES else len(MODULES), name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to run (default: all): {', '.join(MODULES)}, "
                        "or one objective's file, e.g. objectives/dupmae")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--write", action="store_true", help="put the rows into docs/mutation.md")
    parser.add_argument("--keep", action="store_true", help="reuse the last run's results (sources unchanged)")
    parser.add_argument("--survivors", action="store_true", help="re-test only the mutants the last run did not "
                        "kill, with the tests of now (tests added since; a kill stays a kill)")
    parser.add_argument("--unchecked", action="store_true", help="with --survivors: also test the mutants a stopped "
                        "run never reached")
    parser.add_argument("--recount", action="store_true", help="count the last run's results again, with the "
                        "equivalent mutants docs/mutation.md lists now (nothing is run)")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES and not (ROOT / "retromae" / f"{m}.py").is_file()]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}")
    rows = {}
    for name in args.modules or list(MODULES):
        rows[name] = row(name, run_module(name, args.max_children, args.keep, args.recount, args.survivors,
                                         args.unchecked))
        print(rows[name], flush=True)
    if args.write:
        write_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
