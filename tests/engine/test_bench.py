"""The benchmark CLI end to end on a tiny suite, and the headline rule on constructed results."""
from __future__ import annotations

import json
import math
import re
import time

import pytest
import torch

from unlearning import bench

RESULT_KEYS = {
    "benchmark", "setting", "forget_tasks", "n_forget", "seed", "method", "uis", "uis_task", "uis_inst",
    "mia_auc", "mia_auc_original", "mia_auc_retrain", "forget_gap", "seconds", "retrain_seconds",
}


@pytest.fixture
def tiny_suite(monkeypatch):
    suite = {
        "benchmarks": {"indoor": {"name": "indoor", "n_train": 14, "n_test": 8, "height": 16, "width": 16, "seed": 0}},
        "train": {"epochs": 2, "batch_size": 8, "lr": 4e-3, "width": 8, "depth": 2, "head_width": 8, "seed": 0},
        "seeds": [0],
        "n_forget_full": [1],
        "n_forget_partial": 2,
        "retained_sample_size": 8,
        "threads": 1,
        "device": "cpu",
    }
    monkeypatch.setitem(bench.SUITES, "tiny", suite)
    return suite


def test_bench_cli_writes_the_result_contract(tiny_suite, tmp_path, torch_single_thread):
    out = tmp_path / "results.json"
    methods = ["interference_aware", "gradient_ascent", "retrain"]
    code = bench.main(["--suite", "tiny", "--out", str(out), "--methods", *methods, "--cache-dir", str(tmp_path / "cache"),
                       "--no-progress", "--no-shadow", "--method-config", str(_config(tmp_path))])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["suite"] == "tiny"
    # on CPU the instruction set decides which models the seeds give: the results name it
    assert doc["device"].startswith("cpu: ") and torch.backends.cpu.get_cpu_capability() in doc["device"]
    # indoor: one full setting (1 instance) + one partial setting per task (3), one seed, three methods
    # and the independent retrain (the gold standard's recipe with another seed)
    assert len(doc["results"]) == (1 + 3) * (len(methods) + 1)
    for r in doc["results"]:
        assert RESULT_KEYS <= set(r)
        assert r["seconds"] >= r["unlearn_seconds"] > 0
        assert r["setting"] in ("full", "partial")
        if r["setting"] == "partial":
            assert len(r["forget_tasks"]) == 1 and r["n_forget"] == 2
            # uis is the mean over both levels' groups: between the two levels' means
            assert min(r["uis_task"], r["uis_inst"]) - 1e-9 <= r["uis"] <= max(r["uis_task"], r["uis_inst"]) + 1e-9
        else:  # full erasure has no task-level group: uis_task 0, uis the instance level's
            assert r["uis_task"] == 0 and r["uis"] == pytest.approx(r["uis_inst"])
            assert set(r["forget_tasks"]) == {"segmentation", "depth", "normal"}
    gold = [r for r in doc["results"] if r["method"] == "retrain"]
    assert all(r["mia_auc"] == r["mia_auc_retrain"] for r in gold)
    independent = [r for r in doc["results"] if r["method"] == bench.INDEPENDENT_RETRAIN]
    assert len(independent) == 4
    # another initialisation: not the gold standard's numbers, and no UIS-free copy of it
    assert any(r["mia_auc"] != r["mia_auc_retrain"] or r["forget_gap"] != 0 for r in independent)
    assert out.with_suffix(".md").read_text().startswith("# Unlearning benchmark")
    assert out.with_suffix(".png").stat().st_size > 0


def _config(tmp_path):
    path = tmp_path / "methods.json"
    path.write_text(json.dumps({"interference_aware": {"steps": 4}, "gradient_ascent": {"steps": 2}}))
    return path


def _run(method, uis, mia, mia_retrain=0.5, n=8):
    return {"benchmark": "b", "setting": "full", "forget_tasks": ["t"], "n_forget": n, "seed": 0, "method": method,
            "uis": uis, "uis_task": 0.0, "uis_inst": uis, "mia_auc": mia, "mia_auc_original": 0.9,
            "mia_auc_retrain": mia_retrain, "forget_gap": 0.0, "seconds": 1.0, "retrain_seconds": 10.0}


def test_headline_picks_the_lowest_uis_among_baselines_that_forget_as_well():
    results = [
        _run("interference_aware", uis=2.0, mia=0.55),  # |ΔMIA| 0.05
        _run("finetune", uis=0.5, mia=0.85),  # lower UIS but forgets worse: not eligible
        _run("salun", uis=8.0, mia=0.52),  # eligible
        _run("scrub", uis=5.0, mia=0.46),  # eligible and lower UIS than salun
        _run("retrain", uis=1.0, mia=0.5),  # the gold standard, never a baseline
        _run(bench.INDEPENDENT_RETRAIN, uis=0.1, mia=0.53),  # a reference, never a baseline
    ]
    (row,) = bench.headline(results)
    assert row["strongest"] == "scrub"
    assert row["reduction"] == pytest.approx(100 * (1 - 2.0 / 5.0))
    assert row["lowest_uis_baseline"] == "finetune"
    assert row["independent_mia_err"] == pytest.approx(0.03)
    assert row["speedup"] == pytest.approx(10.0)


def test_the_headline_pools_every_method_over_the_same_forget_sets():
    """A merge of pieces that ran other --methods (ours on seeds 0 and 1, a baseline on seed 0)
    pooled ours over both seeds and the baseline over one: the comparison was unpaired."""
    results = [{**_run(method, uis=u, mia=mia), "seed": seed} for method, u, mia, seed in [
        ("interference_aware", 1.0, 0.55, 0), ("interference_aware", 9.0, 0.95, 1),
        ("finetune", 2.0, 0.54, 0), ("retrain", 0.0, 0.5, 0), ("retrain", 0.0, 0.5, 1)]]
    (row,) = bench.headline(results)
    assert (row["uis"], row["mia_err"], row["left_out"]) == (1.0, pytest.approx(0.05), 1)
    assert row["strongest"] == "finetune" and row["reduction"] == pytest.approx(50.0)
    text = bench.markdown({"suite": "t", "device": "cpu", "config": {"seeds": [0, 1]}, "results": results})
    assert "forget sets that not every method ran" in text and "b · full: 1" in text
    # the per-method tables keep every run
    assert bench.aggregate(results)[("b", "full", 8)]["interference_aware"]["runs"] == 2
    # a whole run leaves nothing out, and says nothing about it
    whole = results + [{**_run("finetune", uis=2.0, mia=0.54), "seed": 1}]
    assert bench.headline(whole)[0]["left_out"] == 0
    assert "not every method ran" not in bench.markdown({"suite": "t", "device": "cpu", "config": {"seeds": [0, 1]},
                                                         "results": whole})


def test_a_baseline_with_zero_uis_that_forgets_as_well_is_not_beaten():
    """Nothing is lower than a UIS of 0: the reduction is −∞ (shown so), not blank ("–%"
    read as "not applicable"); 0 when ours is 0 too."""
    results = [_run("interference_aware", uis=2.0, mia=0.55), _run("finetune", uis=0.0, mia=0.52)]
    (row,) = bench.headline(results)
    assert (row["strongest"], row["reduction"]) == ("finetune", -math.inf)
    text = bench.markdown({"suite": "t", "device": "cpu", "config": {"seeds": [0]}, "results": results})
    assert "| finetune | 0.00 | −∞% |" in text
    (row,) = bench.headline([_run("interference_aware", uis=0.0, mia=0.55), _run("finetune", uis=0.0, mia=0.52)])
    assert row["reduction"] == 0.0


def test_the_mia_target_is_read_of_means_per_set_and_per_task():
    """Errors of opposite sign cancel in the difference of the means, not in the others."""
    results = [{**_run("interference_aware", uis=1.0, mia=mia, mia_retrain=retrain), "setting": "partial",
                "forget_tasks": [task], "seed": seed}
               for task, seed, mia, retrain in [("depth", 0, 0.60, 0.50), ("depth", 1, 0.56, 0.50),
                                                ("segmentation", 0, 0.40, 0.50), ("segmentation", 1, 0.44, 0.50)]]
    results.append({**_run("interference_aware", uis=1.0, mia=0.9, mia_retrain=0.1, n=1), "setting": "partial",
                    "forget_tasks": ["depth"]})  # one instance: only a rank, not read
    (row,) = bench.mia_readings(results)
    assert (row["benchmark"], row["setting"], row["sets"]) == ("b", "partial", 4)
    assert row["of_means"] == pytest.approx(0.0, abs=1e-12)
    assert row["per_set"] == pytest.approx(0.08)
    assert row["per_task"] == {"depth": pytest.approx(0.08), "segmentation": pytest.approx(0.08)}
    text = bench.markdown({"suite": "t", "device": "cpu", "config": {"seeds": [0, 1]}, "results": results})
    assert "| b | partial | 4 | 0.000 | 0.080 | depth 0.080, segmentation 0.080 |" in text
    (full,) = bench.mia_readings([_run("interference_aware", uis=1.0, mia=0.6)])
    assert full["per_task"] == {"all": pytest.approx(0.1)}


def test_the_mia_readings_pool_what_the_headline_pools_and_never_average_a_missing_auc_away():
    runs = [{**_run(method, uis=1.0, mia=mia), "seed": seed} for method, mia, seed in [
        ("interference_aware", 0.6, 0), ("interference_aware", 0.4, 1), ("finetune", 0.5, 0)]]
    (row,) = bench.mia_readings(runs)  # seed 1 has no finetune run: left out, as in the headline
    assert (row["sets"], row["of_means"]) == (1, pytest.approx(0.1))
    assert bench.headline(runs)[0]["left_out"] == 1
    (row,) = bench.mia_readings([_run("interference_aware", uis=1.0, mia=float("nan")),
                                 {**_run("interference_aware", uis=1.0, mia=0.6), "seed": 1}])
    assert math.isnan(row["of_means"]) and math.isnan(row["per_set"]) and math.isnan(row["per_task"]["all"])
    # a diverged run of ours (UIS NaN) has no reduction, against a baseline of UIS 0 too
    (head,) = bench.headline([_run("interference_aware", uis=float("nan"), mia=0.55),
                              _run("finetune", uis=0.0, mia=0.52)])
    assert head["reduction"] is None


def test_a_diverged_run_is_never_averaged_away():
    """UIS is NaN for a diverged model; a method with such a run gets NaN means (shown as
    "–") and is never the strongest or the lowest-UIS baseline on its good runs alone."""
    results = [{**_run(method, uis=u, mia=mia), "seed": seed} for method, u, mia, seed in [
        ("interference_aware", 2.0, 0.55, 0), ("interference_aware", 2.0, 0.55, 1),
        ("gradient_ascent", 1.0, 0.5, 0), ("gradient_ascent", float("nan"), 0.5, 1),
        ("scrub", 5.0, 0.5, 0), ("scrub", 5.0, 0.5, 1)]]
    means = bench.aggregate(results)[("b", "full", 8)]
    assert math.isnan(means["gradient_ascent"]["uis"]) and means["gradient_ascent"]["runs"] == 2
    assert means["scrub"]["uis"] == 5.0
    (row,) = bench.headline(results)
    assert row["strongest"] == "scrub" and row["lowest_uis_baseline"] == "scrub"
    assert row["closest_baseline"] == "scrub"  # forgets as well as gradient_ascent, which has a NaN UIS
    assert "| gradient_ascent | – |" in bench.markdown({"suite": "t", "device": "cpu", "config": {"seeds": [0, 1]},
                                                       "results": results})


def test_settings_draw_nested_forget_sets_and_may_restrict_partial_tasks(tiny_suite):
    from unlearning.data import load_splits

    train, _ = load_splits(tiny_suite["benchmarks"]["indoor"])
    suite = {**tiny_suite, "n_forget_full": [1, 3], "n_forget_partial": 2}
    every = bench.settings(train, suite, [0, 1])
    assert [(s["setting"], s["n_forget"], s["seed"]) for s in every[:5]] == [
        ("full", 1, 0), ("full", 3, 0), ("partial", 2, 0), ("partial", 2, 0), ("partial", 2, 0)]
    one, three = every[0]["cells"], every[1]["cells"]
    assert set(one) < set(three) and len(three) == 3 * len(train.tasks)
    assert every[0]["cells"] != every[5]["cells"], "another seed draws other instances"
    only_depth = bench.settings(train, {**suite, "partial_tasks": ["depth"]}, [0])
    assert [s["forget_tasks"] for s in only_depth if s["setting"] == "partial"] == [["depth"]]
    assert all(t == "depth" for s in only_depth if s["setting"] == "partial" for _, t in s["cells"])


def test_workers_train_the_same_gold_standards_ahead(tiny_suite, tmp_path, torch_single_thread):
    """--workers moves the gold standards' training into other processes: same models, same numbers."""
    methods = ["gradient_ascent", "retrain"]
    configs = {"gradient_ascent": {"steps": 2}}
    inline = bench.run_suite("tiny", methods, None, tmp_path / "a", method_configs=configs, progress=False, shadow=False)
    ahead = bench.run_suite("tiny", methods, None, tmp_path / "b", method_configs=configs, progress=False, shadow=False,
                            workers=1)
    assert (inline["config"]["workers"], ahead["config"]["workers"]) == (0, 1)
    fields = ("benchmark", "setting", "forget_tasks", "seed", "method", "uis", "mia_auc", "mia_auc_retrain", "forget_gap")
    assert [{f: r[f] for f in fields} for r in ahead["results"]] == [{f: r[f] for f in fields} for r in inline["results"]]
    # the original, and every gold standard and independent retrain, cached once
    assert len(list((tmp_path / "b").glob("*/bench.json"))) == 1 + 2 * 4  # original + (gold, independent) x 4 settings


def test_shadow_models_are_kept_in_the_cache_like_gold_standards(tiny_suite, tmp_path, torch_single_thread,
                                                                   monkeypatch):
    """interference_aware's shadows are retrains without a fold's cells: trained once into the
    bench cache, so a later run (the next piece on a GPU) loads them instead of training."""
    configs = {"interference_aware": {"steps": 2, "shadow_folds": 2, "shadow_trained_folds": 1}}
    run = lambda caches: bench.run_suite("tiny", ["interference_aware"], None, tmp_path / "cache", method_configs=configs,
                                         progress=False, independent_retrain=False, only_settings=["full:1"],
                                         engine_caches=caches)
    first_caches: dict = {}
    first = run(first_caches)
    (scores,) = [v for k, v in first_caches["indoor"].items() if k[0] == "shadow_scores"]
    assert (scores["folds"], scores["trained_folds"], scores["shadows"]) == (2, 1, 1 + 3)
    # the original, the gold standard and the 1 + T shadows of the trained fold
    assert len(list((tmp_path / "cache").glob("*/bench.json"))) == 1 + 1 + 4

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    import unlearning.train

    monkeypatch.setattr(bench, "train_model", no_training)
    monkeypatch.setattr(unlearning.train, "train_model", no_training)  # the engine's own path
    again = run({})
    assert [(r["uis"], r["mia_auc"]) for r in again["results"]] == [(r["uis"], r["mia_auc"]) for r in first["results"]]


def test_reference_scenes_are_the_methods_held_out_data_and_the_attack_keeps_the_test_split(
        tiny_suite, tmp_path, torch_single_thread, monkeypatch):
    """--reference-scenes: interference_aware's τ comes from held-out scenes of its own, not
    from the test scenes the membership attack then scores it against; the test split, the
    original and the gold standards are the same as without them."""
    seen = []
    real = bench.UnlearnData

    def spy(*args, **kwargs):
        seen.append(list(kwargs["heldout"].instance_ids))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "UnlearnData", spy)
    run = lambda n: bench.run_suite("tiny", ["interference_aware"], None, tmp_path / "cache",
                                    method_configs={"interference_aware": {"steps": 3}}, progress=False, shadow=False,
                                    independent_retrain=False, only_settings=["full:1"], reference_scenes=n)
    plain = run(0)
    assert seen and all(ids == [f"indoor-test-{i:05d}" for i in range(8)] for ids in seen)
    seen.clear()
    own = run(4)
    assert seen and all(ids == [f"indoor-test-{i:05d}" for i in range(8, 12)] for ids in seen)
    assert own["config"]["reference_scenes"] == 4 and "reference_scenes" not in plain["config"]
    (a,), (b,) = plain["results"], own["results"]
    assert (a["mia_auc_original"], a["mia_auc_retrain"]) == (b["mia_auc_original"], b["mia_auc_retrain"])
    # the scenes a larger test split would hold after its first n_test, rendered alone
    from unlearning.data import load_splits

    spec = tiny_suite["benchmarks"]["indoor"]
    reference, larger = bench.reference_split(spec, 4), load_splits({**spec, "n_test": 12})[1]
    assert reference.instance_ids == larger.instance_ids[8:] and torch.equal(reference.images, larger.images[8:])
    assert all(torch.equal(reference.targets[t], larger.targets[t][8:]) for t in reference.tasks)
    with pytest.raises(ValueError, match="not synthetic"):
        bench.reference_split({"name": "nyuv2", "root": str(tmp_path)}, 4)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--suite", "tiny", "--out", str(tmp_path / "r.json"), "--reference-scenes", "-1"])
    assert exc.value.code == 2


def test_reference_scenes_no_memory_here_holds_are_refused_before_the_run(tiny_suite, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--suite", "tiny", "--out", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "cache"),
                    "--reference-scenes", "100000000000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--reference-scenes 100000000000: this run needs at least" in err and "Traceback" not in err
    assert "indoor's 100000000000 reference scenes: " in err and list(tmp_path.iterdir()) == []


def test_the_reference_scenes_check_counts_only_the_benchmarks_with_a_setting_to_run(tmp_path, capsys, monkeypatch):
    import unlearning.resources as resources

    indoor, street = (bench.SUITES["smoke"]["benchmarks"][b] for b in ("indoor", "street"))
    one = resources.scene_bytes(["segmentation", "depth", "normal"], indoor["height"], indoor["width"])
    assert (street["height"], street["width"]) == (indoor["height"], indoor["width"])
    # room for indoor's 1000 reference scenes, not for street's as well; partial:normal is indoor's alone
    monkeypatch.setattr(resources, "machine_memory", lambda: 1000 * one + 1)

    def ran(*a, **k):
        raise RuntimeError("past the check")

    monkeypatch.setattr(bench, "run_suite", ran)
    args = ["--suite", "smoke", "--out", str(tmp_path / "r.json"), "--cache-dir", str(tmp_path / "cache"),
            "--reference-scenes", "1000", "--settings"]
    with pytest.raises(RuntimeError, match="past the check"):  # street's were counted too: refused
        bench.main(args + ["partial:normal"])
    with pytest.raises(SystemExit):
        bench.main(args + ["partial:depth"])
    assert "street's 1000 reference scenes" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["r" * 249 + ".json", "r" * 252])
def test_an_out_name_whose_partial_or_plot_would_be_too_long_is_refused_before_the_run(tiny_suite, tmp_path, capsys,
                                                                                     name):
    # r*249.json is 254 bytes, its partial 262; r*252's plot, r*252.png, is 256. Both used to
    # fail with a traceback after the first setting.
    with pytest.raises(SystemExit) as exc:
        bench.main(["--suite", "tiny", "--out", str(tmp_path / name), "--cache-dir", str(tmp_path / "cache")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot be created: the name" in err and "longer than the 255" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_results_say_where_the_cached_models_were_trained(tiny_suite, tmp_path, torch_single_thread):
    """A cache copied from another machine holds that machine's models and training seconds
    (another CPU's instruction set trains other models from the same seeds): the document
    counts the models by the device that trained them, and the summary names the others."""
    run = lambda: bench.run_suite("tiny", ["gradient_ascent"], None, tmp_path / "cache",
                                  method_configs={"gradient_ascent": {"steps": 1}}, progress=False, shadow=False,
                                  only_settings=["full:1"])
    here = bench._device_name(torch.device("cpu"))
    first = run()
    # the original, the gold standard and the independent retrain
    assert first["config"]["models_trained_on"] == {here: 3}
    metas = list((tmp_path / "cache").glob("*/bench.json"))
    assert len(metas) == 3
    for meta_path in metas:
        meta = json.loads(meta_path.read_text())
        assert (meta["device"], meta["torch"]) == (here, torch.__version__)
        meta["device"] = "cuda: Another GPU"
        meta_path.write_text(json.dumps(meta))
    again = run()
    assert again["config"]["models_trained_on"] == {"cuda: Another GPU": 3}
    assert "3 on cuda: Another GPU" in bench.markdown({**again, "command": "x", "wall_seconds": 1})
    assert "another device" not in bench.markdown({**first, "command": "x", "wall_seconds": 1})
    # an entry from before the field: not said to be another device's, only of unrecorded origin
    old = {**first, "config": {**first["config"], "models_trained_on": {"unrecorded": 2, here: 1}}}
    summary = bench.markdown({**old, "command": "x", "wall_seconds": 1})
    assert "another device" not in summary and "2 models loaded from cache entries that do not record" in summary
    merged = bench.merge([first, {**again, "results": []}], ["a.json", "b.json"])
    assert merged["config"]["models_trained_on"] == {here: 3, "cuda: Another GPU": 3}


def _load_script(name):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(folder))  # the scripts import each other as the command line runs them
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_seed_spread_of_the_mia_difference_on_constructed_runs():
    seed_spread = _load_script("seed_spread")
    results = [
        {**_run("interference_aware", uis=1.0, mia=0.60), "seed": 0},  # d = +0.10
        {**_run("interference_aware", uis=1.0, mia=0.44), "seed": 1},  # d = -0.06
        {**_run("interference_aware", uis=1.0, mia=0.90, n=1), "seed": 0},  # one instance: not counted
        {**_run("finetune", uis=1.0, mia=0.90), "seed": 0},  # not one of the compared methods
    ]
    (row,) = seed_spread.spread(results)
    assert (row["method"], row["runs"]) == ("interference_aware", 2)
    assert row["mean_d"] == pytest.approx(0.02)
    assert row["se_d"] == pytest.approx(0.08)  # sd of (+0.10, -0.06) is 0.08 * sqrt(2); over sqrt(2) runs
    assert row["mean_abs_d"] == pytest.approx(0.08)
    (only_seed_1,) = seed_spread.spread(results, seeds=[1])
    assert only_seed_1["mean_d"] == pytest.approx(-0.06)


def test_compare_variants_pairs_runs_on_the_same_forget_sets():
    compare_variants = _load_script("compare_variants")

    def run(seed, n, uis, mia, retrain=0.5):
        return {"benchmark": "indoor", "setting": "full", "forget_tasks": ["depth"], "n_forget": n, "seed": seed,
                "uis": uis, "mia_auc": mia, "mia_auc_retrain": retrain}

    records = [
        {"variant": "default", "runs": [run(0, 8, 1.0, 0.52), run(1, 8, 2.0, 0.46), run(0, 1, 0.5, 1.0)]},
        {"variant": "other", "runs": [run(0, 8, 1.5, 0.50), run(1, 8, 1.0, 0.50), run(2, 8, 9.0, 0.9)]},  # seed 2: unpaired
    ]
    table = compare_variants.compare(records, "default")
    other = table["other"]["indoor/full"]
    assert other["runs"] == 2
    assert other["uis"] == pytest.approx(1.25)
    assert other["mia_err_n8"] == pytest.approx(0.0)
    assert other["abs_delta_uis_vs_reference"] == pytest.approx(0.75)
    assert other["abs_delta_mia_vs_reference_n8"] == pytest.approx(0.03)
    assert other["max_abs_delta_mia_vs_reference_n8"] == pytest.approx(0.04)
    ref = table["default"]["indoor/full"]
    assert ref["runs"] == 3 and ref["mean_d_n8"] == pytest.approx(-0.01) and ref["mia_err_n8"] == pytest.approx(0.03)
    with pytest.raises(SystemExit, match="reference"):
        compare_variants.compare(records, "missing")


def test_job_ledger_counts_forward_samples_by_phase():
    from unlearning.model import ModelConfig, MultiTaskNet

    job_ledger = _load_script("job_ledger")
    from unlearning.methods import interference_aware

    model = MultiTaskNet(ModelConfig(tasks={"depth": 1}, width=4, depth=2, head_width=4))
    x = torch.rand(3, 3, 8, 8)
    real = interference_aware.per_sample_losses
    with job_ledger.Ledger() as ledger:
        ledger.phase = "job"
        model(x)  # gradient on inside a job: a training pass
        with torch.no_grad():
            model(x[:2])  # gradient-free inside a job (a teacher's outputs)
        # the method scoring held-out data inside a job: a τ refresh
        interference_aware.per_sample_losses(model, _ledger_data(4))
        ledger.phase = "evaluation"
        model(x[:1])  # outside the job, gradient or not, it is the phase's
    assert dict(ledger.counts) == {"job_training": 3, "job": 2, "job_tau_refresh": 4, "evaluation": 1}
    assert ledger.forward_equivalents() == 3 * 3 + 2 + 4 + 1
    model(x)  # the hook and the spy are gone after the block
    assert interference_aware.per_sample_losses is real
    assert sum(ledger.counts.values()) == 10


def _ledger_data(n):
    from unlearning.data.base import MultiTaskDataset

    return MultiTaskDataset("t", ["depth"], torch.rand(n, 3, 8, 8), {"depth": torch.rand(n, 1, 8, 8) + 0.5},
                            [f"h{k}" for k in range(n)], 0)


def test_step_budget_snapshots_the_trained_model_with_the_counts_so_far():
    from unlearning.model import ModelConfig, MultiTaskNet

    step_budget = _load_script("step_budget")
    model = MultiTaskNet(ModelConfig(tasks={"depth": 1}, width=4, depth=2, head_width=4)).train()
    teacher = MultiTaskNet(ModelConfig(tasks={"depth": 1}, width=4, depth=2, head_width=4)).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(3, 3, 8, 8)
    states = []
    with step_budget.Ledger() as ledger, step_budget.Checkpoints(ledger, every=2) as checkpoints:
        ledger.phase = "job"
        for _ in range(5):
            with torch.no_grad():
                teacher(x[:1])  # a gradient-free pass is not the trained model
            loss = model(x)["depth"].square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            checkpoints.progress(0.0)
    assert [c["steps"] for c in checkpoints.taken] == [2, 4]
    assert checkpoints.student is model
    for snap in checkpoints.taken:
        after = states[snap["steps"] - 1]
        assert all(torch.equal(snap["state"][k], after[k]) for k in after)
        assert snap["counts"] == {"job_training": 3 * snap["steps"], "job": snap["steps"]}
    first, second = (c["state"] for c in checkpoints.taken)  # copies, not views of the live model
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_step_budget_summary_takes_an_early_stopped_run_at_its_final_model():
    step_budget = _load_script("step_budget")

    def cp(steps, uis, mia, eq):
        return {"steps": steps, "uis": uis, "mia_auc": mia, "job_forward_equivalents": eq}

    runs = [
        {"benchmark": "b", "setting": "full", "mia_auc_retrain": 0.5, "steps_run": 20,
         "checkpoints": [cp(10, 4.0, 0.60, 1000), cp(20, 2.0, 0.55, 2000)]},
        {"benchmark": "b", "setting": "full", "mia_auc_retrain": 0.6, "steps_run": 13,  # stopped at step 13
         "checkpoints": [cp(10, 6.0, 0.70, 1100), cp(13, 1.0, 0.62, 1400)]},
    ]
    rows = step_budget.summarise(runs, every=10)
    assert [r["steps"] for r in rows] == [10, 20]
    assert rows[0]["uis"] == 5.0 and rows[0]["mia_err"] == pytest.approx(0.1) and rows[0]["job_forward_equivalents"] == 1050
    assert rows[1]["uis"] == 1.5 and rows[1]["mia_err"] == pytest.approx(0.035) and rows[1]["job_forward_equivalents"] == 1700
    assert rows[1]["ratio_full_scale_retrain"] == round(step_budget.full_scale_retrain_equivalents() / 1700, 1)


def test_conflict_counter_counts_projections_that_leave_a_conflict():
    conflicts = _load_script("orthogonalization_conflicts")
    from unlearning.methods import interference_aware

    real = interference_aware._orthogonalize
    g = torch.tensor([1.0, 0.0, 0.0])
    r1, r2 = torch.tensor([-1.0, 1.0, 0.0]), torch.tensor([0.2, -1.0, 0.3])  # r2 conflicts once r1 is removed
    with conflicts.ConflictCounter() as counter:
        interference_aware._orthogonalize(g, [r2])  # no conflict: no projection
        interference_aware._orthogonalize(g, [r1, r2])  # one projection, leaves r2 conflicting
        interference_aware._orthogonalize(g, [r1, r2], iterate=True)  # leaves none
    assert interference_aware._orthogonalize is real
    c = counter.counts
    assert (c["calls"], c["projections"], c["left_a_conflict"]) == (3, 2, 1)
    cos = -0.4 / (0.5 ** 0.5 * float(r2.norm()))  # (0.5, 0.5, 0) · r2 over the norms
    assert c["worst_cosine"] == pytest.approx(cos, abs=1e-4)


def test_pieces_of_a_suite_merge_into_one_table(tiny_suite, tmp_path, torch_single_thread):
    """A suite run in pieces (here: one seed each) sharing a cache pools into one document."""
    common = ["--suite", "tiny", "--methods", "gradient_ascent", "retrain", "--cache-dir", str(tmp_path / "cache"),
              "--no-progress", "--no-shadow", "--no-independent-retrain", "--method-config", str(_config(tmp_path))]
    pieces = []
    for seed in (0, 1):
        pieces.append(tmp_path / f"seed{seed}.json")
        assert bench.main([*common, "--seeds", str(seed), "--out", str(pieces[-1])]) == 0
    docs = [json.loads(p.read_text()) for p in pieces]
    out = tmp_path / "merged.json"
    assert bench.main(["--merge", *map(str, pieces), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["results"] == docs[0]["results"] + docs[1]["results"]
    assert merged["config"]["seeds"] == [0, 1]
    assert merged["config"]["methods"] == ["gradient_ascent", "retrain"]
    assert [p["source"] for p in merged["config"]["pieces"]] == list(map(str, pieces))
    assert merged["wall_seconds"] == round(docs[0]["wall_seconds"] + docs[1]["wall_seconds"], 1)
    assert merged["command"].startswith("python -m unlearning.bench --merge")
    # a merge merges again: the first piece alone, then the second added to it, gives the same document
    bench.main(["--merge", str(pieces[0]), "--out", str(tmp_path / "first.json")])
    assert bench.main(["--merge", str(tmp_path / "first.json"), str(pieces[1]), "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: v for k, v in again.items() if k != "command"} == {k: v for k, v in merged.items() if k != "command"}
    table = out.with_suffix(".md").read_text()
    assert docs[1]["command"] in table and "Seeds: [0, 1]" in table
    assert out.with_suffix(".png").stat().st_size > 0


def _doc(**changes):
    doc = {"suite": "s", "device": "cpu: x", "wall_seconds": 1.0, "command": "c",
           "config": {"train": {"epochs": 2}, "torch": "2", "seeds": [0], "methods": ["m"],
                      "method_configs": {"m": {"steps": 4}}, "prepare_seconds": {}, "original_seconds": {}},
           "results": [_run("m", 1.0, 0.5)]}
    for key, value in changes.items():
        if key in doc["config"]:
            doc["config"] = {**doc["config"], key: value}
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize("other, message", [
    (_doc(), "is in a.json and in b.json"),
    (_doc(device="cuda: H100"), "device"),
    (_doc(suite="other"), "suite"),
    (_doc(train={"epochs": 3}), "['train']"),
    (_doc(method_configs={"m": {"steps": 5}}, results=[_run("m", 1.0, 0.5, n=1)]), "other hyper-parameters"),
    # a piece run with the method's DEFAULTS records no overrides for it (here: no shadow recipe)
    (_doc(method_configs={}, results=[_run("m", 1.0, 0.5, n=1)]), "other hyper-parameters"),
], ids=["duplicate run", "device", "suite", "suite definition", "method config", "defaults against overrides"])
def test_merge_refuses_pieces_that_do_not_belong_to_one_table(other, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        bench.merge([_doc(), other], ["a.json", "b.json"])


def test_merge_on_the_command_line_runs_nothing_and_names_the_problem(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_doc()))
    b.write_text(json.dumps(_doc(device="cuda: H100")))
    with pytest.raises(SystemExit):
        bench.main(["--merge", str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert "device" in capsys.readouterr().err and not (tmp_path / "m.json").exists()
    with pytest.raises(SystemExit):
        bench.main(["--merge", str(a), "--seeds", "1", "--out", str(tmp_path / "m.json")])
    assert "--seeds" in capsys.readouterr().err
    b.write_text(json.dumps({"runs": []}))
    with pytest.raises(SystemExit):
        bench.main(["--merge", str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert f"{b} is not a results document" in capsys.readouterr().err


def test_settings_run_alone_and_each_finished_setting_is_written(tiny_suite, tmp_path, torch_single_thread, capsys,
                                                                 monkeypatch):
    common = ["--suite", "tiny", "--methods", "gradient_ascent", "--cache-dir", str(tmp_path / "cache"),
              "--no-progress", "--no-shadow", "--no-independent-retrain", "--method-config", str(_config(tmp_path))]
    out = tmp_path / "piece.json"
    assert bench.main([*common, "--settings", "partial:depth", "full:1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert sorted(bench.setting_label(r) for r in doc["results"]) == ["full:1", "partial:depth"]
    assert doc["config"]["settings"] == ["partial:depth", "full:1"] and "incomplete" not in doc
    with monkeypatch.context() as m:
        m.setattr(bench, "load_splits", lambda *a, **k: pytest.fail("rendered before the settings were checked"))
        with pytest.raises(SystemExit):
            bench.main([*common, "--settings", "partial:sky", "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert "partial:sky" in err and "partial:normal" in err and not (tmp_path / "x.json").exists()

    seen = []
    cut = tmp_path / "cut.json"

    def cut_off_in_third(partial):
        seen.append(len(partial["results"]))
        if len(seen) == 2:
            raise KeyboardInterrupt  # the run is cut off in its third setting

    # what the CLI's checkpoint writes after each setting
    with pytest.raises(KeyboardInterrupt):
        bench.run_suite("tiny", ["gradient_ascent"], None, tmp_path / "cache" / "tiny", independent_retrain=False,
                        shadow=False, progress=False, method_configs=json.loads(_config(tmp_path).read_text()),
                        on_update=lambda d: (cut.write_text(json.dumps(d)), cut_off_in_third(d)))
    assert seen == [1, 2]
    assert [bench.setting_label(r) for r in json.loads(cut.read_text())["results"]] == ["full:1", "partial:segmentation"]

    # a cut-off piece merges (its rows are whole runs), and the table says it was cut off
    cut.write_text(json.dumps({**json.loads(cut.read_text()), "incomplete": True, "command": "cut", "wall_seconds": 1}))
    normal = tmp_path / "normal.json"
    assert bench.main([*common, "--settings", "partial:normal", "--out", str(normal)]) == 0
    assert bench.main(["--merge", str(normal), str(cut), "--out", str(tmp_path / "merged.json")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [p.get("incomplete", False) for p in merged["config"]["pieces"]] == [False, True]
    assert "`cut`, 1 s (cut off" in (tmp_path / "merged.md").read_text()


def test_the_cli_checkpoint_is_marked_whole_and_alone(tmp_path, monkeypatch):
    """What the CLI writes after a setting: marked incomplete, renamed into place (no
    half-written file), and no table or plot of an earlier run at that path beside it."""
    out = tmp_path / "r.json"
    out.with_suffix(".md").write_text("an earlier run's table")
    out.with_suffix(".png").write_bytes(b"an earlier run's plot")

    def cut_off(*args, on_update=None, **kwargs):
        on_update({"suite": "smoke", "results": [{"method": "m"}]})
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_suite", cut_off)
    assert bench.main(["--suite", "smoke", "--methods", "gradient_ascent", "--cache-dir", str(tmp_path / "c"),
                       "--out", str(out)]) == 130  # one line on stderr (test_ctrl_c_is_one_line_saying_what_is_kept)
    doc = json.loads(out.read_text())
    assert doc["incomplete"] is True and doc["results"] == [{"method": "m"}]
    assert doc["command"] == f"python -m unlearning.bench --suite smoke --methods gradient_ascent --cache-dir {tmp_path / 'c'} --out {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "r.json"]


def test_job_timing_times_jobs_on_the_cached_original_against_the_recipe(tmp_path, monkeypatch):
    job_timing = _load_script("job_timing")
    suite = {"benchmarks": {"indoor": {"name": "indoor", "n_train": 12, "n_test": 8, "height": 12, "width": 16, "seed": 0}},
             "train": {"epochs": 4, "batch_size": 4, "lr": 4e-3, "width": 4, "depth": 2, "head_width": 4, "seed": 0},
             "seeds": [0, 1], "n_forget_full": [1], "n_forget_partial": 2, "partial_tasks": ["depth"],
             "retained_sample_size": 4, "threads": 1, "device": "cpu"}
    monkeypatch.setitem(bench.SUITES, "tiny", suite)
    # the step time is the difference of a 2-epoch and a 12-epoch training: a few milliseconds
    # on this model, which a busy machine's noise can reverse (the script then stops, as it
    # should). A pause per step, on top of the real training, makes the difference plain.
    real_train = job_timing.train_model

    def paced(train, recipe, **kwargs):
        model = real_train(train, recipe, **kwargs)
        time.sleep(0.02 * job_timing.training_steps(len(train), recipe))
        return model

    monkeypatch.setattr(job_timing, "train_model", paced)
    out = tmp_path / "timing.json"
    assert job_timing.main(["--suite", "tiny", "--cache-dir", str(tmp_path / "cache"), "--settings", "full:1",
                            "partial:depth", "--config", '{"steps": 2}', "--train-epochs", "2", "12",
                            "--measure-retrain", "--data", "resident", "host", "--out", str(out),
                            "--variants", '{"default": {}, "batched": {"orthogonalize_impl": "batched"}}']) == 0
    doc = json.loads(out.read_text())
    assert [r["steps"] for r in doc["train_steps"]["runs"]] == [6, 36]  # ceil(12 / 4) steps an epoch
    runs = doc["train_steps"]["runs"]
    assert doc["train_steps"]["seconds_per_step"] == pytest.approx((runs[1]["seconds"] - runs[0]["seconds"]) / 30)
    assert doc["retrain_measured"]["setting"] == "full:1" and doc["retrain_measured"]["seconds"] > 0
    assert [(r["setting"], r["seed"], r["variant"], r["data"]) for r in doc["jobs"]] == [
        (s, seed, v, d) for seed in (0, 1) for s in ("full:1", "partial:depth") for v in ("default", "batched")
        for d in ("resident", "host")]
    assert doc["complete"] is True
    for r in doc["jobs"]:
        assert r["seconds"] > 0 and 0 <= r["mia_auc"] <= 1 and r["uis"] >= 0
        # full:1 trains on 11 instances (3 steps an epoch), partial:depth on all 12 (3 too)
        assert r["retrain_seconds_estimate"] == pytest.approx(doc["train_steps"]["seconds_per_step"] * 12, abs=0.01)
        assert r["speed_up_measured"] == round(doc["retrain_measured"]["seconds"] / r["seconds"], 1)
    # one untimed job per data mode first, at 2 steps: what the per-version cache keeps beyond
    # cache_seconds (the data's device copy, the original's numbers) is not charged to the first timed job
    assert [(w["data"], w["config"]) for w in doc["warmup"]] == [("resident", {"steps": 2}), ("host", {"steps": 2})]
    assert all(w["seconds"] > 0 for w in doc["warmup"])
    with pytest.raises(SystemExit, match="no setting of tiny is named"):
        job_timing.main(["--suite", "tiny", "--cache-dir", str(tmp_path / "cache"), "--settings", "full:8",
                         "--out", str(out)])


def test_job_timing_finds_the_original_where_the_bench_keeps_it(tmp_path, monkeypatch):
    # it looked in --cache-dir itself, the bench keeps a suite's models in <cache-dir>/<suite>:
    # on the GPU it would have trained the committed `full` original again, for its whole stage
    job_timing = _load_script("job_timing")
    suite = {"benchmarks": {"indoor": {"name": "indoor", "n_train": 8, "n_test": 6, "height": 8, "width": 8, "seed": 0}},
             "train": {"epochs": 1, "batch_size": 4, "lr": 4e-3, "width": 4, "depth": 1, "head_width": 4, "seed": 0},
             "seeds": [0], "n_forget_full": [1], "n_forget_partial": 1, "partial_tasks": ["depth"],
             "retained_sample_size": 4, "threads": 1, "device": "cpu"}
    monkeypatch.setitem(bench.SUITES, "tiny", suite)
    cache, out = tmp_path / "cache", tmp_path / "timing.json"
    with pytest.raises(SystemExit, match=re.escape(f"--require-cached: the tiny suite's indoor original is not in "
                                                   f"{cache}/tiny/")):
        job_timing.main(["--suite", "tiny", "--cache-dir", str(cache), "--require-cached", "--out", str(out)])
    assert not out.exists()
    spec = suite["benchmarks"]["indoor"]
    train, _ = bench.load_splits(spec)
    _, recipe = bench.suite_runtime(suite)
    bench.cached_original(cache / "tiny", train, spec, recipe, torch.device("cpu"))  # as the bench stores it
    assert job_timing.main(["--suite", "tiny", "--cache-dir", str(cache), "--require-cached", "--settings", "full:1",
                            "--config", '{"steps": 1}', "--train-epochs", "1", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and len(doc["jobs"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "timing.json"]  # nothing left aside


def test_gpu_probe_writes_what_it_measured_as_it_goes(tmp_path, monkeypatch):
    gpu_probe = _load_script("gpu_probe")
    suite = {"benchmarks": {"indoor": {"name": "indoor", "n_train": 8, "n_test": 6, "height": 8, "width": 8, "seed": 0}},
             "train": {"epochs": 1, "batch_size": 4, "lr": 4e-3, "width": 4, "depth": 1, "head_width": 4, "seed": 0},
             "seeds": [0], "threads": 1, "device": "cpu"}
    monkeypatch.setitem(bench.SUITES, "tiny", suite)
    out = tmp_path / "probe.json"
    seen = []
    real = gpu_probe.write_json
    monkeypatch.setattr(gpu_probe, "write_json", lambda path, doc: (seen.append(sorted(doc)), real(path, doc)))
    assert gpu_probe.main(["--suite", "tiny", "--steps", "2", "--batch-sizes", "2", "--device", "cpu",
                           "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["steps_per_training"] == 2 and doc["train_step_seconds"] > 0
    assert doc["by_batch_size"]["2"]["steps_per_training"] == 4 and doc["peak_memory_gib"] is None
    assert len(seen) >= 4 and "render_seconds" not in seen[0] and "train_step_seconds" not in seen[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json"]


def test_a_diverged_runs_infinite_figures_are_written_as_null():
    # strict JSON: a diverged baseline's forget_gap is infinite (its forget losses are), and
    # json.dumps wrote it as Infinity
    assert bench._num(float("inf")) is None and bench._num(float("-inf")) is None
    assert bench._num(float("nan")) is None and bench._num(0.1234567) == 0.123457


def test_the_summary_says_what_its_runs_pool_and_puts_a_diverged_methods_missing_uis_last():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    smoke, scale = (json.loads((root / f"{n}.json").read_text()) for n in ("smoke", "scale"))
    assert bench._pooled_words(smoke) == "full: 1 and 8 instances; partial: every task"
    assert bench._pooled_words(scale) == "full: 8 instances; partial: depth"  # it said "1 and 8 ... every task"
    # a method whose runs all diverged (UIS None) sorts last in its table, the others in UIS order
    rows = [dict(r) for r in smoke["results"]]
    for r in rows:
        if r["method"] == "salun":
            r["uis"] = None
    text = bench.markdown({**smoke, "results": rows})
    table = text.split("### indoor · full · 1 instance(s)")[1].split("###")[0]
    methods = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "method" not in line]
    uis = [float(line.split("|")[2]) for line in table.splitlines()
           if line.startswith("| ") and "method" not in line and "salun" not in line]
    assert methods[-1] == "salun" and uis == sorted(uis)


@pytest.mark.parametrize("checkpointed", [True, False])
def test_ctrl_c_is_one_line_saying_what_is_kept(tmp_path, monkeypatch, capsys, checkpointed):
    # `python -m unlearning.bench` printed a traceback (train and unlearn said one line)
    out = tmp_path / "r.json"
    if checkpointed:  # what run_suite's checkpoint leaves after a finished setting
        out.write_text(json.dumps({"suite": "smoke", "results": [], "incomplete": True}))

    def cut_off(args, command):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_run", cut_off)
    assert bench.main(["--suite", "smoke", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert (f"{out} keeps the settings that finished" in err) if checkpointed else err == "interrupted: nothing was written"
