"""The measurement scripts in benchmarks/ still start, and the analysis scripts still
reproduce the committed figures from the committed JSON files.

Nothing else runs these scripts, and benchmarks/README.md quotes their commands: a
script broken by an engine change (an import moved, an option refused) would only
show on the next GPU session or when someone reruns a documented command. Every
script is run as the README runs it (``python benchmarks/<script>.py``, the repository
on PYTHONPATH) in a subprocess; the ``--help`` calls run a few at a time, since each
imports torch (~2 s)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


def run_script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(BENCH / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(SCRIPTS, pool.map(lambda name: run_script(name, "--help"), SCRIPTS)))


def test_the_scripts_are_found():
    assert "tune_interference_aware.py" in SCRIPTS and "job_timing.py" in SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help(helps, name):
    done = helps[name]
    assert done.returncode == 0, f"{name} --help: exit {done.returncode}\n{done.stderr[-2000:]}"
    assert "usage:" in done.stdout


def without_command(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "command"}


def test_compare_variants_reproduces_the_committed_comparison(tmp_path):
    out = tmp_path / "compare.json"
    done = run_script("compare_variants.py", "benchmarks/refresh_subset/indoor.json",
                      "benchmarks/refresh_subset/street.json", "--reference", "default", "--out", str(out))
    assert done.returncode == 0, done.stderr
    committed = json.loads((BENCH / "refresh_subset" / "compare.json").read_text())
    assert without_command(json.loads(out.read_text())) == without_command(committed)


def test_seed_spread_reproduces_the_committed_spread(tmp_path):
    out = tmp_path / "spread.json"
    done = run_script("seed_spread.py", "benchmarks/mia_seeds/smoke_8seeds.json", "--json", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == json.loads((BENCH / "mia_seeds" / "spread_all.json").read_text())
    assert "| indoor | full | interference_aware |" in done.stdout


def test_sweep_baselines_table_of_the_committed_sweep():
    done = run_script("sweep_baselines.py", "--table", "--out", "benchmarks/sweep_baselines.json")
    assert done.returncode == 0, done.stderr
    methods = json.loads((BENCH / "sweep_baselines.json").read_text())["methods"]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| method | chosen setting |")
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[4:]] == list(methods)
