"""The README's Python example of the engine runs as written (with fewer epochs) and does what it says."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from unlearning.data import load_reference

pytestmark = pytest.mark.usefixtures("torch_single_thread")

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The indented code block after the paragraph that starts with "From Python"."""
    text = README.read_text()
    match = re.search(r"^From Python [^\n]*(?:\n[^\n]+)*\n\n((?:    [^\n]*\n|\n)+)", text, flags=re.M)
    assert match, "README.md has no 'From Python' example"
    return "\n".join(line[4:] for line in match.group(1).splitlines()) + "\n"


def test_the_readme_python_example_runs_and_chains_two_erasures(capsys):
    code = readme_example()
    smaller = {"epochs=40": "epochs=2",
               '"n_train": 32, "n_test": 16, "height": 24, "width": 32': '"n_train": 14, "n_test": 8, "height": 16, "width": 16',
               "run_unlearning_job(model, train, test, full)": "run_unlearning_job(model, train, test, full, config={'steps': 5})",
               "run_unlearning_job(model, train, test, full, reference=load_reference(spec, 16))":
                   "run_unlearning_job(model, train, test, full, config={'steps': 5}, reference=load_reference(spec, 4))"}
    for what, instead in smaller.items():
        assert what in code
        code = code.replace(what, instead)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    first, second, gold, report, full = (scope[k] for k in ("first", "second", "gold", "report", "full"))
    assert first.metrics["mode"] == "full" and first.metrics["forget_cells"] == [list(c) for c in full]
    # the method read scenes of its own, the attack the same test split
    own = scope["own"]
    assert own.metrics["reference"] == {"source": "own", "instances": 4}
    assert not set(load_reference(scope["spec"], 4).instance_ids) & set(scope["test"].instance_ids)
    assert own.metrics["mia_auc_original"] == first.metrics["mia_auc_original"]
    assert second.metrics["mode"] == "partial" and second.metrics["method"] == "neggrad_plus"
    # the second job ran on the data without the first erasure: the instance is gone from it
    assert "indoor-00007" not in scope["retained"].instance_ids
    # the gold standard was trained with the example's recipe, and the report compares with it
    assert gold.log["config"]["train"]["epochs"] == 2 and gold.log["config"]["train"]["width"] == 8
    assert report["mia_auc_retrain"] == gold.metrics["mia_auc"] and report["forget_gap"] is not None
    assert report["mia_auc"] == first.metrics["mia_auc"]
    printed = capsys.readouterr().out.split("\n")
    assert len(printed[0].split()) == 3 and printed[1].startswith("{'source': 'own', 'instances': 4} ")
    assert len(printed[2].split()) == 2
