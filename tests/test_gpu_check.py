"""The GPU check's machinery, tested on the CPU: a section that fails or runs out of time makes the whole run fail
and shows in the summary (`timeout ... | tee` used to report tee's status: every failure looked like a success);
the default sections fit the budget; the torch search check runs its GPU code path on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bash(script: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(tmp_path), **env})


def test_sections_keep_their_exit_status_and_the_summary_says_so(tmp_path):
    script = """source scripts/gpu_sections.sh
section good 10 "^answer" bash -c 'echo noise; echo answer 42'
section broken 10 "^partial" bash -c 'echo partial result; exit 3'
section slow 1 "never" sleep 5
skip later "not supported here"
summary
"""
    done = run_bash(script, tmp_path)
    assert done.returncode == 1, done.stdout
    table = done.stdout[done.stdout.index("| section |"):]
    assert "| good | ok | " in table and "| answer 42 |" in table
    assert "| broken | failed (exit 3) |" in table and "| partial result |" in table
    assert "| slow | timed out |" in table and "| later | skipped |" in table
    assert "failed or timed out: 2" in table
    assert (tmp_path / "broken.txt").read_text() == "partial result\n", "each section's output is kept"
    good = run_bash("source scripts/gpu_sections.sh\nsection good 10 x true\nsummary\n", tmp_path)
    assert good.returncode == 0 and "| good | ok |" in good.stdout


def test_a_failing_section_fails_the_gpu_check(tmp_path):
    """scripts/gpu_check.sh itself, with a python3 whose GPU check fails (and no GPU): it goes on, prints the table
    and exits 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'a fake GPU, 1 MiB'\n")
    (bin_dir / "python3").write_text(f"""#!/bin/sh
case "$*" in
  *gpu_checks.py\\ search-exact*) echo "fp32-exact: NO"; exit 3 ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    done = run_bash("bash scripts/gpu_check.sh search-exact", tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| search-exact | failed (exit 3) |" in done.stdout and "fp32-exact: NO" in done.stdout
    assert "| search-exact | failed (exit 3) |" in (tmp_path / "summary.md").read_text()


def test_the_default_sections_fit_the_budget():
    """A GPU is lent for 15 minutes in all, start-up included: the default run must end within 8 minutes whatever
    its sections do, so their limits add up to at most 7 (the set-up takes seconds: nothing is installed for them)."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    defaults = re.search(r"sections=\$\{\*:-([^}]*)\}", script).group(1).split()
    assert defaults[0] == "search-exact", "what only a GPU shows comes first"
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"section ([\w-]+) (\d+) ", script)}
    assert sum(limits[name] for name in defaults if name in limits) <= 420
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


def test_the_search_check_runs_its_gpu_code_path_on_the_cpu():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_checks.py"), "search-exact", "--device", "cpu",
                           "--dtype", "float16", "--passages", "20000", "--queries", "40", "--k", "50"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "fp32-exact: yes" in done.stdout
    reordered = float(re.search(r"fp16 scores alone would reorder ([\d.]+)%", done.stdout).group(1))
    assert reordered > 20, "the data is the kind on which fp16 scores go wrong"
