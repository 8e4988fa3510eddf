"""interference_aware on a tiny memorised model: forgetting, protected heads, projection geometry."""
from __future__ import annotations

import copy

import pytest
import torch

from unlearning.data.base import MultiTaskDataset
from unlearning.losses import per_sample_losses
from unlearning.methods import UnlearnData, get_method
from unlearning.methods.interference_aware import DEFAULTS, prepare
from unlearning.metrics import mia_auc
from unlearning.projection import energy_basis, forget_projector, orth, task_subspaces
from unlearning.train import TrainConfig, train_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TASKS = ["segmentation", "depth", "normal"]


def random_dataset(n: int, seed: int, size=(8, 8), classes: int = 3, prefix: str = "i") -> MultiTaskDataset:
    """Random images with random targets: a model can only memorise them, so seen
    instances have clearly lower losses than unseen ones."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.rand(n, 3, h, w, generator=g)
    targets = {
        "segmentation": torch.randint(0, classes, (n, h, w), generator=g),
        "depth": 0.5 + torch.rand(n, 1, h, w, generator=g),
        "normal": torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1),
    }
    return MultiTaskDataset("tiny", TASKS, images, targets, [f"{prefix}{j}" for j in range(n)], num_classes=classes)


@pytest.fixture(scope="module")
def memorised():
    torch.manual_seed(0)
    train = random_dataset(16, 0)
    test = random_dataset(16, 1, prefix="t")
    cfg = TrainConfig(epochs=80, batch_size=8, lr=5e-3, width=8, depth=2, head_width=8, seed=0)
    model = train_model(train, cfg, progress=False)
    return model, train, test


def _mia(model, train, test, cells):
    ids = list(dict.fromkeys(i for i, _ in cells))
    tasks = sorted({t for _, t in cells})
    members = per_sample_losses(model, train, [train.index_of(i) for i in ids])
    heldout = per_sample_losses(model, test)
    return mia_auc({t: members[t] for t in tasks}, {t: heldout[t] for t in tasks})


def _data(train, test, cells, **kw):
    return UnlearnData(train, cells, train.without(cells), heldout=test, **kw)


@pytest.mark.parametrize("optimizer", [{}, {"optimizer": "sgd", "lr": 0.05}, {"orthogonalize_impl": "batched"}],
                         ids=["adam", "sgd", "batched-orthogonalization"])
def test_forgetting_lowers_membership_signal(memorised, optimizer):
    model, train, test = memorised
    cells = [(i, t) for i in train.instance_ids[:4] for t in TASKS]
    before = _mia(model, train, test, cells)
    assert before > 0.9, "the tiny model should have memorised its training data"
    unlearned, log = get_method("interference_aware")(model, _data(train, test, cells), optimizer)
    assert log["orthogonalize_impl"] == optimizer.get("orthogonalize_impl", "per_tensor")  # "auto" on a CPU
    after = _mia(unlearned, train, test, cells)
    assert after < before - 0.25
    assert abs(after - 0.5) < 0.3
    # the caller's model is untouched
    assert _mia(model, train, test, cells) == before
    # the bounded signal stopped near tau: no cell is pushed far beyond it
    for t, losses in log["final_forget_losses"].items():
        assert max(losses) < 2.0 * max(log["tau"][t])


def test_partial_mode_keeps_protected_heads_bit_identical(memorised):
    model, train, test = memorised
    cells = [(i, "depth") for i in train.instance_ids[:3]]
    unlearned, log = get_method("interference_aware")(model, _data(train, test, cells), {"steps": 10})
    before, after = model.state_dict(), unlearned.state_dict()
    protected = [n for n in before if n.startswith("heads.segmentation.") or n.startswith("heads.normal.")]
    assert protected, "the protected heads' parameters must be found to be checked"
    for name in protected:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("heads.depth."))
    assert log["protected_tasks"] == ["segmentation", "normal"]


def test_a_frozen_model_is_unlearned_on_a_trainable_copy(memorised):
    """A caller may hand over a model frozen for serving (``requires_grad_(False)``): the
    method trains its own copy all the same (its first backward failed, "element 0 of
    tensors does not require grad"), the same as from the unfrozen model, and the
    caller's model stays frozen."""
    model, train, test = memorised
    cells = [(i, "depth") for i in train.instance_ids[:3]]
    frozen = copy.deepcopy(model).requires_grad_(False)
    out, _ = get_method("interference_aware")(frozen, _data(train, test, cells), {"steps": 5})
    reference, _ = get_method("interference_aware")(model, _data(train, test, cells), {"steps": 5})
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), reference.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(frozen.state_dict().values(), out.state_dict().values()))


def test_partial_mode_heads_only_keeps_protected_predictions_identical(memorised):
    model, train, test = memorised
    cells = [(i, "depth") for i in train.instance_ids[:3]]
    cfg = {"steps": 10, "heads_only_partial": True}
    unlearned, _ = get_method("interference_aware")(model, _data(train, test, cells), cfg)
    before, after = model.state_dict(), unlearned.state_dict()
    for name in before:
        if not name.startswith("heads.depth."):
            assert torch.equal(before[name], after[name]), name
    with torch.no_grad():
        x = test.batch(range(4)).images
        a, b = model.eval()(x, ["segmentation", "normal"]), unlearned.eval()(x, ["segmentation", "normal"])
    for t in ("segmentation", "normal"):
        assert torch.equal(a[t], b[t])


def test_two_sided_band_pulls_overshooting_cells_back(memorised):
    model, train, test = memorised
    cells = [(i, t) for i in train.instance_ids[:2] for t in TASKS]
    # a level far below the cells' current loss: every cell is "above the band" and descends;
    # one-sided, the same run takes retain-only steps
    tau = {t: 1e-6 for t in TASKS}
    data = _data(train, test, cells)
    cfg = {"tau": tau, "steps": 20, "settle_steps": 100}
    _, one = get_method("interference_aware")(model, data, {**cfg, "two_sided": False})
    _, two = get_method("interference_aware")(model, data, {**cfg, "two_sided": True})
    assert two["tau_history"] == []  # a given tau is never re-estimated
    total = lambda log: sum(sum(v) for v in log["final_forget_losses"].values())
    assert total(two) < total(one)


def test_shadow_scores_cover_every_cell_once_and_are_cached(memorised):
    from unlearning.methods.interference_aware import shadow_scores

    model, train, test = memorised
    recipe = {"epochs": 3, "batch_size": 8, "lr": 5e-3, "width": 8, "depth": 2, "head_width": 8, "seed": 0}
    data = _data(train, test, [(train.instance_ids[0], "depth")])
    first = shadow_scores(model, data, recipe, folds=2, seed=0)
    n = len(data.cache)
    assert shadow_scores(model, data, recipe, folds=2, seed=0) is first and len(data.cache) == n
    assert first["shadows"] == 2 * (1 + len(TASKS))
    for mode in ("full", "partial"):
        cells = {(i, t) for i, by_task in first[mode].items() for t in by_task}
        assert cells == set(train.cells())
        assert all(0.0 <= v <= 1.0 for by_task in first[mode].values() for v in by_task.values())


def test_shadow_scores_of_some_folds_only(memorised):
    """``trained_folds``: the shadows of the first n folds only, so only their cells are scored."""
    from unlearning.methods.interference_aware import shadow_scores

    model, train, test = memorised
    recipe = {"epochs": 2, "batch_size": 8, "lr": 5e-3, "width": 8, "depth": 2, "head_width": 8, "seed": 0}
    data = _data(train, test, [(train.instance_ids[0], "depth")])
    part = shadow_scores(model, data, recipe, folds=4, seed=0, trained_folds=1, extrapolate="task_mean")
    assert (part["shadows"], part["folds"], part["trained_folds"]) == (1 + len(TASKS), 4, 1)
    assert (part["extrapolate"], part["extrapolated"]) == ("task_mean", {})
    scored = set(part["full"])
    assert part["measured_instances"] == sorted(scored)
    assert len(scored) == len(train) // 4  # one fold's instances (the fixture has a multiple of 4)
    # partial mode: every task of the fold's instances, one per rotation
    assert {(i, t) for i, by_task in part["partial"].items() for t in by_task} == {
        c for c in train.cells() if c[0] in scored}
    assert shadow_scores(model, data, recipe, folds=4, seed=0) is not part  # another cache entry
    for bad in (0, 5):
        with pytest.raises(ValueError, match="shadow_trained_folds"):
            shadow_scores(model, data, recipe, folds=4, seed=0, trained_folds=bad)
    with pytest.raises(ValueError, match="shadow_extrapolate"):
        shadow_scores(model, data, recipe, folds=4, seed=0, trained_folds=1, extrapolate="nearest")


def test_shadow_scores_of_some_folds_predict_the_others_from_loss_ranks(memorised):
    """``extrapolate="loss_rank"`` (the default): the trained fold's cells keep their measured
    scores; every other cell gets the fitted line's value at its loss rank under the model."""
    from unlearning.losses import per_sample_losses
    from unlearning.methods.interference_aware import loss_ranks, shadow_scores

    model, train, test = memorised
    recipe = {"epochs": 2, "batch_size": 8, "lr": 5e-3, "width": 8, "depth": 2, "head_width": 8, "seed": 0}
    data = _data(train, test, [(train.instance_ids[0], "depth")])
    measured = shadow_scores(model, data, recipe, folds=4, seed=0, trained_folds=1, extrapolate="task_mean")
    full = shadow_scores(model, data, recipe, folds=4, seed=0, trained_folds=1)
    assert full["extrapolate"] == "loss_rank" and full["shadows"] == 1 + len(TASKS)
    assert full["measured_instances"] == measured["measured_instances"] == sorted(measured["full"])
    own = per_sample_losses(model, train)
    for mode in ("full", "partial"):
        assert {(i, t) for i, by_task in full[mode].items() for t in by_task} == set(train.cells())
        for i, by_task in measured[mode].items():
            assert full[mode][i] == pytest.approx(by_task)
        for t in TASKS:
            fit = full["extrapolated"][mode][t]
            n_measured = sum(t in by_task for by_task in measured[mode].values())
            assert (fit["fitted"], fit["predicted"]) == (n_measured, len(train) - n_measured)
            ranks = loss_ranks(own[t])
            for row, i in enumerate(train.instance_ids):
                if t not in measured[mode].get(i, {}):
                    want = min(1.0, max(0.0, fit["intercept"] + fit["slope"] * float(ranks[row])))
                    assert full[mode][i][t] == pytest.approx(want, abs=1e-5)
    # with every fold trained there is nothing to predict
    every = shadow_scores(model, data, recipe, folds=2, seed=0)
    assert (every["trained_folds"], every["extrapolate"], every["extrapolated"]) == (2, "task_mean", {})
    assert every["measured_instances"] is None


def test_shadow_folds_partition_the_instances_by_seed():
    """Every instance in exactly one fold, sizes within one, the same split for the same
    seed (shadow_scores and the benchmark scripts must agree on it), another for another."""
    from unlearning.methods.interference_aware import shadow_folds

    ids = [f"i{n}" for n in range(23)]
    folds = shadow_folds(ids, 4, 0)
    assert sorted(i for fold in folds for i in fold) == sorted(ids)
    assert sorted(len(f) for f in folds) == [5, 6, 6, 6]
    assert shadow_folds(ids, 4, 0) == folds
    assert shadow_folds(ids, 4, 1) != folds


def test_loss_ranks_are_mid_ranks_of_the_finite_losses():
    from unlearning.methods.interference_aware import loss_ranks

    r = loss_ranks(torch.tensor([0.3, float("nan"), 0.1, 0.3, 0.2]))
    # finite: 0.1, 0.2, 0.3, 0.3 -> mid ranks 0.5, 1.5, 3, 3 over 4
    assert r[[0, 2, 3, 4]].tolist() == pytest.approx([3 / 4, 0.5 / 4, 3 / 4, 1.5 / 4])
    assert torch.isnan(r[1])


def test_extrapolated_scores_fit_a_line_in_the_loss_rank():
    from unlearning.methods.interference_aware import extrapolated_scores

    ranks = {"depth": {"a": 0.0, "b": 0.5, "c": 1.0, "d": 0.25, "e": 0.9, "f": 2.0},
             "normal": {"a": 0.1, "b": 0.7}}
    table = {"a": {"depth": 0.9, "normal": 0.4}, "b": {"depth": 0.6}, "c": {"depth": 0.3}}
    predicted, fits = extrapolated_scores(table, ranks)
    # depth: score = 0.9 - 0.6 rank exactly; "f" lies past the data and is clamped at 0
    assert predicted["d"]["depth"] == pytest.approx(0.75)
    assert predicted["e"]["depth"] == pytest.approx(0.36)
    assert predicted["f"]["depth"] == 0.0
    assert fits["depth"] == {"intercept": pytest.approx(0.9), "slope": pytest.approx(-0.6), "fitted": 3, "predicted": 3}
    # one scored normals cell: no slope to fit, the unscored cell gets its score
    assert predicted["b"]["normal"] == pytest.approx(0.4) and fits["normal"]["slope"] == 0.0
    assert "a" not in predicted and "c" not in predicted


def test_extrapolated_scores_leave_nan_scores_and_ranks_out_of_the_fit():
    # shadow_scores writes NaN for a cell it could not score, and loss_ranks NaN for a cell
    # without a finite loss: one NaN in the fit made every prediction of the task NaN, which
    # the clamp turned into 0.0 (cells taken to the top quantile, the most forgetting)
    from unlearning.methods.interference_aware import extrapolated_scores

    nan = float("nan")
    ranks = {"depth": {"a": 0.0, "b": 0.5, "c": 1.0, "x": 0.8, "d": 0.25, "e": nan}}
    table = {"a": {"depth": 0.9}, "b": {"depth": 0.6}, "c": {"depth": 0.3}, "x": {"depth": nan}}
    predicted, fits = extrapolated_scores(table, ranks)
    assert predicted == {"d": {"depth": pytest.approx(0.75)}}  # "e" (no rank) stays unscored
    assert fits["depth"] == {"intercept": pytest.approx(0.9), "slope": pytest.approx(-0.6), "fitted": 3, "predicted": 1}


def test_an_unscored_cell_takes_its_tasks_mean_score_over_the_table(memorised):
    """A request cell outside the folds a partial calibration trained is taken to where an
    average cell of its task lands, not to the request's other cells."""
    model, train, test = memorised
    ids = train.instance_ids
    given = {"full": {}, "partial": {ids[0]: {"depth": 0.9}, ids[5]: {"depth": 0.6}, ids[6]: {"depth": 0.3}}}
    cells = [(ids[0], "depth"), (ids[1], "depth")]
    _, log = get_method("interference_aware")(model, _data(train, test, cells), {"shadow_scores": given, "steps": 2})
    assert log["tau_quantiles"]["depth"] == pytest.approx([0.1, 0.4])  # 1 - 0.9; 1 - mean(0.9, 0.6, 0.3)
    assert log["calibration"]["task_mean_scores"] == {"depth": pytest.approx(0.6)}
    assert log["calibration"]["scores"]["depth"] == [0.9, None]
    assert log["calibration"]["expected_mia_auc"] == pytest.approx(0.75)


def test_a_job_batching_a_partial_and_a_full_request_treats_each_instance_by_its_own_mode(memorised):
    """Each forget row takes its own mode, as the evaluation tells them apart: an instance that
    keeps a cell (partial) takes the partial level and its kept cells are a retain reference;
    one that leaves the data (full, also when its other cells were erased earlier) the full level."""
    model, train, test = memorised
    ids = train.instance_ids
    cells = [(ids[0], "depth")] + [(ids[1], t) for t in TASKS]
    cfg = {"steps": 2, "tau_quantile": 0.5, "tau_quantile_partial": 0.55}
    _, log = get_method("interference_aware")(model, _data(train, test, cells), cfg)
    assert log["tau_quantiles"] == {t: [0.55, 0.5] for t in TASKS}
    assert "own_retained_cells" in log["retain_references"]
    # the rest of an instance whose depth was erased by an earlier job: it leaves the data now
    earlier = train.without([(ids[2], "depth")])
    rest = [(ids[2], "segmentation"), (ids[2], "normal")]
    _, log = get_method("interference_aware")(model, _data(earlier, test, rest), cfg)
    assert log["tau_quantiles"] == {"segmentation": [0.5], "normal": [0.5]}
    assert "own_retained_cells" not in log["retain_references"] and log["protected_tasks"] == ["depth"]
    # with shadow scores, each row reads its own mode's table
    given = {"full": {ids[1]: {t: 0.8 for t in TASKS}}, "partial": {ids[0]: {t: 0.6 for t in TASKS}}}
    _, log = get_method("interference_aware")(model, _data(train, test, cells),
                                              {"shadow_scores": given, "calibrate_per": "cell", "steps": 2})
    assert log["tau_quantiles"]["depth"] == pytest.approx([0.4, 0.2])
    assert log["tau_quantiles"]["segmentation"][1] == pytest.approx(0.2)  # row 0's is not a forget cell
    calibration = log["calibration"]
    assert calibration["mode"] == "mixed" and sorted(calibration["modes"]) == ["full", "partial"]
    assert calibration["modes"]["partial"]["scores"]["depth"] == [0.6, None]
    assert calibration["expected_mia_auc"] == pytest.approx((0.6 + 3 * 0.8) / 4)  # over the job's 4 cells


@pytest.mark.parametrize("per", ["request", "cell"])
def test_shadow_scores_set_each_cells_quantile(memorised, per):
    from unlearning.methods.interference_aware import shadow_scores

    model, train, test = memorised
    recipe = {"epochs": 3, "batch_size": 8, "lr": 5e-3, "width": 8, "depth": 2, "head_width": 8, "seed": 0}
    ids = train.instance_ids[:3]
    cells = [(i, "depth") for i in ids]  # partial erasure: the partial-mode scores apply
    data = _data(train, test, cells)
    table = shadow_scores(model, data, recipe, folds=2, seed=0)["partial"]
    _, log = get_method("interference_aware")(model, data, {"shadow_recipe": recipe, "shadow_folds": 2,
                                                            "calibrate_per": per, "steps": 2})
    scores = torch.tensor([table[i]["depth"] for i in ids], dtype=torch.float64)
    want = (1 - scores).clamp(0.02, 0.98) if per == "cell" else (1 - scores.mean()).clamp(0.05, 0.95).expand(3)
    assert torch.allclose(torch.tensor(log["tau_quantiles"]["depth"], dtype=torch.float64), want, atol=1e-6)
    assert log["calibration"]["mode"] == "partial"
    assert abs(log["calibration"]["expected_auc"]["depth"] - float(scores.mean())) < 1e-6
    assert abs(log["calibration"]["expected_mia_auc"] - float(scores.mean())) < 1e-6
    with pytest.raises(ValueError, match="calibrate_per"):
        get_method("interference_aware")(model, data, {"shadow_recipe": recipe, "shadow_folds": 2, "calibrate_per": "x"})


def test_repair_option_may_move_protected_heads(memorised):
    model, train, test = memorised
    cells = [(i, "depth") for i in train.instance_ids[:3]]
    cfg = {"steps": 3, "repair_steps": 3, "repair_protected_heads": True}
    unlearned, _ = get_method("interference_aware")(model, _data(train, test, cells), cfg)
    before, after = model.state_dict(), unlearned.state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("heads.segmentation."))


def test_repair_steps_weigh_the_retain_term_as_the_loop_does(memorised, monkeypatch):
    """θ ← θ - η λ P g_r: repair steps used weight 1, while Adam's second moments were built
    at λ's scale (with λ 8 the first repair steps were an eighth of the size meant)."""
    from unlearning.methods import interference_aware as ia

    model, train, test = memorised
    weights = []
    real = ia._mean_retain
    monkeypatch.setattr(ia, "_mean_retain", lambda r_out, n, weight: (weights.append(weight), real(r_out, n, weight))[1])
    cells = [(i, "depth") for i in train.instance_ids[:2]]
    get_method("interference_aware")(model, _data(train, test, cells),
                                     {"steps": 2, "settle_steps": 0, "repair_steps": 2, "retain_weight": 4.0})
    assert len(weights) >= 4 and set(weights) == {4.0}


def test_repair_steps_take_a_step_with_a_forget_only_loop(memorised):
    """retain_weight 0 (a forget-only loop, then repair): weighed by λ the repair's retain
    term was zero, and its steps moved nothing."""
    model, train, test = memorised
    cells = [(i, "depth") for i in train.instance_ids[:2]]
    cfg = {"steps": 2, "settle_steps": 0, "retain_weight": 0.0}
    without, _ = get_method("interference_aware")(model, _data(train, test, cells), {**cfg, "repair_steps": 0})
    repaired, _ = get_method("interference_aware")(model, _data(train, test, cells), {**cfg, "repair_steps": 3})
    assert any(not torch.equal(a, b) for a, b in zip(without.state_dict().values(), repaired.state_dict().values()))


def test_empty_forget_set_is_refused(memorised):
    model, train, test = memorised
    with pytest.raises(ValueError, match=r"^interference_aware: the forget set \(forget_cells\) is empty$"):
        get_method("interference_aware")(model, _data(train, test, []), {})


def test_energy_basis_is_orthonormal_and_keeps_energy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 40, generator=g, dtype=torch.float64) * torch.tensor([5, 3, 1, 0.1, 0.05, 0.01], dtype=torch.float64)[:, None]
    gram = a @ a.T
    u = energy_basis(gram, 0.9)
    assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-10)
    vals = torch.linalg.eigvalsh(gram).flip(0)
    kept = float(((u.T @ gram @ u).trace()) / gram.trace())
    assert kept >= 0.9 and u.shape[1] < 6
    assert float(vals[: u.shape[1] - 1].sum() / vals.sum()) < 0.9  # the smallest rank that reaches 0.9


def test_task_subspaces_and_projector_geometry(memorised):
    model, train, _ = memorised
    # at energy 0.5 some layers leave the forget task room outside the protected subspace
    # (at 0.8 the protected tasks span every layer and each partial Q is empty)
    spaces = task_subspaces(model, train, energy=0.5, n_samples=8)
    assert spaces, "one entry per shared conv"
    with_room = 0
    for layer, per_task in spaces.items():
        for t, u in per_task.items():
            assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-8), (layer, t)
        q = forget_projector(per_task, ["depth"], ["segmentation", "normal"])
        if q.shape[1]:
            with_room += 1
            assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=torch.float64), atol=1e-8)
            u_p = orth(torch.cat([per_task["segmentation"], per_task["normal"]], 1))
            assert float((u_p.T @ q).abs().max()) < 1e-8, layer
        # full mode: nothing protected, Q spans the forget tasks' subspaces
        q_full = forget_projector(per_task, TASKS, [])
        u_f = torch.cat([per_task[t] for t in TASKS], 1)
        assert torch.allclose(q_full @ (q_full.T @ u_f), u_f, atol=1e-8)
    assert with_room > 0, "the partial-mode geometry was never checked: every Q was empty"


def test_projector_on_constructed_subspaces():
    e = torch.eye(4, dtype=torch.float64)
    spaces = {"a": e[:, :2], "b": e[:, 1:3]}
    q = forget_projector(spaces, ["a"], ["b"])
    assert q.shape == (4, 1)
    assert torch.allclose(q.abs().flatten(), e[:, 0])


def test_prepare_fills_the_cache_once(memorised):
    model, train, test = memorised
    cells = [(train.instance_ids[0], "depth")]
    data = _data(train, test, cells)
    prepare(model, data, DEFAULTS)
    keys = set(data.cache)
    assert any(k[0] == "heldout_losses" for k in keys) and any(k[0] == "features" for k in keys)
    assert not any(k[0] == "task_subspaces" for k in keys), "projection is off by default: no subspaces"
    prepare(model, data, {**DEFAULTS, "project": True})
    keys = set(data.cache)
    assert any(k[0] == "task_subspaces" for k in keys)
    before = dict(data.cache)
    prepare(model, data, {**DEFAULTS, "project": True})
    assert set(data.cache) == keys and all(data.cache[k] is before[k] for k in keys)  # not computed again


def test_a_cache_handed_to_another_model_is_not_read_as_its_own(memorised):
    """The levels, features and subspaces cached per model version were keyed by the data
    alone: a second model given the first one's cache read the first one's held-out losses."""
    from unlearning.methods.interference_aware import heldout_losses, representation
    from unlearning.projection import cached_subspaces

    model, train, test = memorised
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    data = _data(train, test, [(train.instance_ids[0], "depth")])
    prepare(model, data, {**DEFAULTS, "project": True})
    mine = heldout_losses(model, data)
    theirs = heldout_losses(other, data)
    assert not torch.equal(mine["depth"], theirs["depth"])
    assert heldout_losses(model, data) is mine  # each model's own entry is still reused
    assert representation(other, data) is not representation(model, data)
    assert cached_subspaces(other, train, data.cache, DEFAULTS["energy"], DEFAULTS["subspace_samples"]) is not \
        cached_subspaces(model, train, data.cache, DEFAULTS["energy"], DEFAULTS["subspace_samples"])


def test_preconditioned_forget_step_stays_in_the_projected_subspace(memorised):
    """The surgery acts on the step actually taken: Adam's preconditioner is applied
    before the projection, so a shared conv moves only within range(Q)."""
    from unlearning.methods.interference_aware import forget_projector
    from unlearning.projection import cached_subspaces, shared_convs

    model, train, test = memorised
    cells = [(i, "depth") for i in train.instance_ids[:3]]
    data = _data(train, test, cells)
    # no retain step (λ = 0): the whole step is the projected, orthogonalised forget step
    cfg = {"steps": 1, "project": True, "energy": 0.5, "retain_weight": 0.0, "tau_refresh": 0}
    unlearned, log = get_method("interference_aware")(model, data, cfg)
    spaces = cached_subspaces(model, train, data.cache, 0.5, DEFAULTS["subspace_samples"])
    before, after = model.state_dict(), unlearned.state_dict()
    checked = 0
    for name in shared_convs(model):
        q = forget_projector(spaces[name], ["depth"], ["segmentation", "normal"])
        delta = (after[name + ".weight"] - before[name + ".weight"]).double().reshape(q.shape[0], -1)
        if q.shape[1] == 0:
            assert torch.count_nonzero(delta) == 0, name
            continue
        assert float(delta.norm()) > 0, name
        outside = delta - q @ (q.T @ delta)
        assert float(outside.norm()) < 1e-4 * float(delta.norm()), name  # float32 weights
        checked += 1
    assert checked, "at least one shared conv has room for the forget step"


def test_stepper_preconditions_the_parts_not_their_sum():
    """Where the forget and retain gradients cancel, the preconditioned forget part stays
    at Adam's unit scale instead of blowing up."""
    from unlearning.methods.interference_aware import Stepper

    p = torch.nn.Parameter(torch.zeros(3))
    g_f = torch.tensor([1.0, 1e-3, 0.5])
    g_r = torch.tensor([-1.0, 2.0, 0.0])  # cancels g_f in the first coordinate
    stepper = Stepper({**DEFAULTS})
    (pf,), (pr,) = stepper.precondition([p], [g_f], [g_r])
    assert float(pf.abs().max()) <= 1.0 + 1e-6 and float(pr.abs().max()) <= 1.0 + 1e-6
    assert pf[0] == pytest.approx(1 / 2 ** 0.5, rel=1e-4)  # 1 / sqrt(1² + 1²), not 1 / |1 - 1|
    assert pf[2] == pytest.approx(1.0, rel=1e-4)
    stepper.step([p], [pf + pr])
    # first Adam step: momentum bias-corrected, θ moves by lr × the preconditioned update
    assert torch.allclose(p.detach(), -DEFAULTS["lr"] * (pf + pr), atol=1e-9)
    with pytest.raises(ValueError, match="optimizer"):
        Stepper({**DEFAULTS, "optimizer": "rmsprop"})


def test_given_shadow_scores_are_used_without_training(memorised):
    """A caller that kept the scores (the service, per lineage) passes them back: no
    recipe needed, each cell goes to its given score; a cell without one gets the
    mean score of its task over the table, or the fixed quantile when none is scored."""
    model, train, test = memorised
    ids = train.instance_ids[:2]
    cells = [(i, t) for i in ids for t in TASKS]
    given = {"full": {ids[0]: {t: 0.25 for t in TASKS}}, "partial": {}}
    _, log = get_method("interference_aware")(model, _data(train, test, cells),
                                              {"shadow_scores": given, "steps": 2, "tau_quantile": 0.5})
    for t in TASKS:
        assert log["tau_quantiles"][t] == [0.75, 0.75]
    assert log["calibration"]["expected_mia_auc"] == 0.25
    assert log["config"]["shadow_scores"] == "<3 cells>"  # the table is not copied into the log
    _, log = get_method("interference_aware")(model, _data(train, test, cells),
                                              {"shadow_scores": {"full": {}}, "steps": 2, "tau_quantile": 0.5})
    assert log["tau_quantiles"]["depth"] == [0.5, 0.5] and log["calibration"]["expected_mia_auc"] is None


def test_scores_as_shadow_scores_and_the_service_give_them_pass_the_check_and_nan_is_no_score(memorised):
    """``shadow_scores`` is checked before any work (:mod:`unlearning.methods.params`), and what
    the code itself produces passes: :func:`shadow_scores`' result, its other keys included,
    and the service's stored calibration after its JSON round trip, even with the NaN it
    writes for a cell without a labelled pixel. The method reads that NaN as no score: an
    unscored cell takes its task's mean over the scored ones (the NaN made that mean NaN,
    and torch's quantile refused it)."""
    import json
    import math

    from unlearning.methods.interference_aware import shadow_scores
    from unlearning.methods.params import config_problems

    model, train, test = memorised
    blank, other = train.instance_ids[:2]
    targets = {t: v.clone() for t, v in train.targets.items()}
    targets["segmentation"][0] = -1  # no labelled pixel: no loss, so no score
    unlabelled = MultiTaskDataset(train.name, train.tasks, train.images, targets, train.instance_ids, train.num_classes)
    cells = [(other, "segmentation")]  # partial erasure: the instance keeps its depth and normal
    scores = shadow_scores(model, _data(unlabelled, test, cells), {"epochs": 1}, folds=2, seed=0,
                           trainer=lambda cells, recipe: model)  # every shadow the memorised model: no training
    assert math.isnan(scores["partial"][blank]["segmentation"])
    stored = json.loads(json.dumps({"kind": "interference_aware.shadow_scores", "sha256": "0" * 64,
                                    "recipe": {"epochs": 1}, "seed": 0, **scores}))  # worker.calibration's payload
    service = {"full": stored["full"], "partial": stored["partial"]}  # what a job of the lineage is given
    for given in (scores, stored, service):
        assert config_problems("interference_aware", {"shadow_scores": given}) == []
    # the forgotten cell unscored (outside the trained folds of a "task_mean" calibration, say)
    del service["partial"][other]["segmentation"]
    finite = [v["segmentation"] for v in service["partial"].values()
              if "segmentation" in v and not math.isnan(v["segmentation"])]
    _, log = get_method("interference_aware")(model, _data(unlabelled, test, cells),
                                              {"shadow_scores": service, "steps": 2})
    calibration = log["calibration"]
    assert calibration["scores"]["segmentation"] == [None]  # unscored: the task's mean
    assert calibration["task_mean_scores"]["segmentation"] == pytest.approx(sum(finite) / len(finite), abs=1e-6)
    assert calibration["expected_mia_auc"] == calibration["task_mean_scores"]["segmentation"]
    # the task's only score NaN: none at all, so the fixed quantile
    _, log = get_method("interference_aware")(model, _data(unlabelled, test, cells),
                                              {"shadow_scores": {"partial": {other: {"segmentation": float("nan")}}},
                                               "steps": 2, "tau_quantile_partial": 0.4})
    assert log["tau_quantiles"]["segmentation"] == [0.4] and log["calibration"]["expected_mia_auc"] is None


def test_tau_refresh_scores_a_fixed_subset_of_a_large_heldout_set(memorised, monkeypatch):
    from unlearning.methods import interference_aware

    model, train, test = memorised
    cells = [(i, t) for i in train.instance_ids[:2] for t in TASKS]
    scored = []
    real = interference_aware.per_sample_losses

    def spy(m, dataset, indices=None, **kw):
        if dataset is test:
            scored.append(len(dataset) if indices is None else len(indices))
        return real(m, dataset, indices, **kw)

    monkeypatch.setattr(interference_aware, "per_sample_losses", spy)
    cfg = {"steps": 7, "tau_refresh": 2, "settle_steps": 100}
    data = _data(train, test, cells)
    _, log = get_method("interference_aware")(model, data, {**cfg, "tau_refresh_sample": 6})
    # once per model version: the whole set (tau's starting levels) and the subset under
    # the original model; then 6 instances at each of the refreshes (steps 2, 4, 6)
    assert scored == [16, 6, 6, 6, 6]
    assert [h["step"] for h in log["tau_history"]] == [2, 4, 6]
    scored.clear()
    again = _data(train, test, cells)
    get_method("interference_aware")(model, again, {**cfg, "tau_refresh_sample": 6})
    assert scored == [16, 6, 6, 6, 6]  # a new cache: the subset is scored again under the original model
    assert interference_aware.refresh_subset(model, again, 6)[0] == interference_aware.refresh_subset(model, data, 6)[0]
    scored.clear()
    get_method("interference_aware")(model, _data(train, test, cells), {**cfg, "tau_refresh_sample": None})
    assert scored == [16, 16, 16, 16]  # all of it at every refresh; no subset when it is the whole set
    idx, _ = interference_aware.refresh_subset(model, data, 6)
    assert len(set(idx)) == 6 and all(0 <= j < 16 for j in idx)


def test_refreshed_levels_scale_the_full_sets_level_by_the_subsets_shift():
    from unlearning.methods.interference_aware import levels, refreshed_levels

    full = torch.linspace(0.1, 2.0, 40)
    before = full[::4]  # the subset's losses under the original model
    q = torch.tensor([0.3, 0.5, 0.8])
    tau0 = levels(full, q)
    assert torch.allclose(refreshed_levels(tau0, q, before, before), tau0)
    # every held-out loss up by 25% under the current model: the levels follow exactly
    assert torch.allclose(refreshed_levels(tau0, q, 1.25 * before, before), 1.25 * tau0)
    # NaN cells (unsupervised) are ignored, as by levels()
    with_nan = torch.cat([before, torch.tensor([float("nan")])])
    assert torch.allclose(refreshed_levels(tau0, q, 2 * with_nan, with_nan), 2 * tau0)
    # an original quantile of zero cannot be scaled: the subset's own level is used
    zeros = torch.zeros(10)
    assert torch.allclose(refreshed_levels(tau0, q, zeros + 0.5, zeros), torch.full((3,), 0.5))


def test_forget_weights_on_hand_computed_cells():
    """τ 1, band 0.1, ramp 0.5: the pull fades over [0.5, 1], is 0 in [1, 1.1] and pushes
    back (negative) above 1.1; rows that are not forget cells weigh nothing."""
    from unlearning.methods.interference_aware import forget_weights

    loss = torch.tensor([0.2, 0.75, 1.05, 1.2, 1.5, 0.1])
    tau = torch.ones(6)
    has = torch.tensor([True, True, True, True, True, False])
    w, active = forget_weights(loss, tau, has, band=0.1, ramp=0.5, two_sided=True)
    assert torch.allclose(w, torch.tensor([1.0, 0.5, 0.0, -0.2, -0.8, 0.0]))
    assert active == 4
    w, active = forget_weights(loss, tau, has, band=0.1, ramp=0.5, two_sided=False)
    assert torch.allclose(w, torch.tensor([1.0, 0.5, 0.0, 0.0, 0.0, 0.0])) and active == 2
    w, active = forget_weights(loss, tau, has, band=0.1, ramp=0.0, two_sided=True)
    assert torch.allclose(w, torch.tensor([1.0, 1.0, 0.0, -1.0, -1.0, 0.0])) and active == 4
    # levels per cell: the ramp is relative to each cell's own τ
    w, _ = forget_weights(torch.tensor([1.5, 3.0, 4.6]), torch.tensor([2.0, 4.0, 4.0]), torch.ones(3, dtype=torch.bool),
                          0.1, 0.5, True)
    assert torch.allclose(w, torch.tensor([0.5, 0.5, -0.1]))  # 0.5 / 1, 1 / 2, -(4.6 - 4.4) / 2
    # a level of 0 and a row without a level give 0/0 and NaN inside the ramp: never in w
    w, active = forget_weights(torch.tensor([0.0, 0.3, 0.2]), torch.tensor([0.0, 0.0, float("nan")]),
                               torch.tensor([True, True, False]), 0.1, 0.5, True)
    assert torch.equal(w, torch.tensor([0.0, -1.0, 0.0])) and active == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collinear_references_remove_only_their_span(dtype):
    """References that span less than their count (the same instances drawn twice, a zero
    gradient): QR's extra columns were arbitrary directions, and projecting them out too
    took a random part of the forget gradient. Both paths now remove the span alone."""
    from unlearning.methods.interference_aware import _orthogonalize, orthogonalize_all

    g = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=dtype)
    r = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=dtype)
    r = -r if float(g @ r) > 0 else r  # conflicts
    exact = g - (g @ r) / (r @ r) * r
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for refs in ([r, 2 * r], [r, r.clone()], [r, 3 * r, 0.5 * r]):
        out, n = _orthogonalize(g, refs)
        assert n == len(refs) and torch.allclose(out, exact, atol=tol), (out - exact).abs().max()
        (batched,), _ = orthogonalize_all([g], [[x] for x in refs])
        assert torch.allclose(batched, exact, atol=tol)
    # a small reference is judged against its own norm: orthogonal to a large one, on a tensor
    # of the full suite's size, it is a direction of its own (a tolerance scaled by the larger
    # norm and the size dropped it, and the step still conflicted with it)
    n = 589_824
    big = torch.zeros(n, dtype=dtype)
    big[0] = -1.0
    small = torch.zeros(n, dtype=dtype)
    small[1] = -0.05
    h = torch.zeros(n, dtype=dtype)
    h[:3] = 1.0
    out, k = _orthogonalize(h, [big, small])
    assert k == 2 and float(out @ big) == 0 and float(out @ small) == 0 and float(out[2]) == 1
    # references that do span their count keep QR's basis: the same numbers as before, bit for bit
    s = -torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=dtype).abs() * torch.sign(g)
    basis = torch.linalg.qr(torch.stack([r, s], 1))[0]
    out, n = _orthogonalize(g, [r, s])
    assert n == 2 and torch.equal(out, g - basis @ (basis.T @ g))


def test_references_equal_up_to_rounding_do_not_enlarge_the_batched_step():
    """One batch drawn as both references, summed in another order on a GPU: the batched
    pseudo-inverse, at double precision's tolerance, inverted the float32 rounding between
    them as a second direction, and the "projection" made the step up to 9x longer. Now it
    removes their one direction, as the per-tensor path does."""
    from unlearning.methods.interference_aware import _orthogonalize, orthogonalize_all

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for trial in range(300):
        n = int(torch.randint(8, 5000, (), generator=gen))
        r1 = torch.randn(n, generator=gen)
        noise = torch.randn(n, generator=gen, dtype=torch.float64)
        r2 = (r1.double() + 1e-7 * noise * r1.abs().double()).float()  # r1 up to rounding
        g = -r1 + torch.randn(n, generator=gen)  # conflicts with both
        (batched,), removed = orthogonalize_all([g], [[r1], [r2]])
        per_tensor, _ = _orthogonalize(g, [r1, r2])
        assert int(removed) == 2
        worst = max(worst, float(batched.norm() / g.norm()))
        assert torch.allclose(batched, per_tensor, atol=1e-4 * float(g.norm())), trial
    assert worst <= 1.0 + 1e-5  # a projection never lengthens the step
    # and references that are close but distinct directions stay two (a tolerance on the Gram's
    # eigenvalues as loose as the one on singular values merged them at correlation 0.999,
    # and the step still conflicted with the second)
    for corr in (0.999, 0.9999):
        n = 100_000
        r1 = torch.randn(n, generator=gen)
        other = torch.randn(n, generator=gen)
        other -= (other @ r1) / (r1 @ r1) * r1
        r2 = corr * r1 / r1.norm() + (1 - corr**2) ** 0.5 * other / other.norm()
        g = -r1 / r1.norm() - 2 * r2 + 0.1 * torch.randn(n, generator=gen) / n**0.5
        (batched,), _ = orthogonalize_all([g], [[r1], [r2]])
        per_tensor, removed = _orthogonalize(g, [r1, r2])
        assert removed == 2 and torch.allclose(batched, per_tensor, atol=1e-3 * float(g.norm())), corr
        assert abs(float(batched @ r2)) < 1e-4 * float(g.norm() * r2.norm())


def test_orthogonalization_removes_exactly_the_conflicts():
    """One projection leaves the step orthogonal to the references it conflicted with and
    untouched when none conflicts; a reference made to conflict by that projection (here
    r2, correlated with r1) is caught only with ``iterate``, after which no reference's
    loss rises to first order."""
    from unlearning.methods.interference_aware import _orthogonalize

    g = torch.tensor([1.0, 0.0, 0.0])
    r1 = torch.tensor([-1.0, 1.0, 0.0])  # conflicts: g·r1 = -1
    r2 = torch.tensor([0.2, -1.0, 0.3])  # agrees with g (0.2), not with g minus its r1 part
    same, n = _orthogonalize(g, [r2, None])
    assert n == 0 and same is g

    once, n = _orthogonalize(g, [r1, r2])
    assert n == 1
    assert torch.allclose(once, torch.tensor([0.5, 0.5, 0.0]))  # g - (g·r1) r1 / |r1|²
    assert float(once @ r1) == pytest.approx(0.0, abs=1e-6)
    assert float(once @ r2) == pytest.approx(0.1 - 0.5)  # the new conflict

    it, n = _orthogonalize(g, [r1, r2], iterate=True)
    assert n == 2
    assert float(it @ r1) == pytest.approx(0.0, abs=1e-6) and float(it @ r2) == pytest.approx(0.0, abs=1e-6)
    normal = torch.linalg.cross(r1, r2)  # what is left of g: its part along r1 × r2
    assert torch.allclose(it, (g @ normal) / (normal @ normal) * normal, atol=1e-6)
    # a matrix-shaped gradient keeps its shape
    g2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    out, n = _orthogonalize(g2, [torch.tensor([[-1.0, 1.0], [0.0, 0.0]])], iterate=True)
    assert n == 1 and out.shape == (2, 2) and torch.allclose(out, torch.tensor([[0.5, 0.5], [0.0, 0.0]]))


def test_orthogonalizing_every_tensor_at_once_equals_the_per_tensor_projection():
    """orthogonalize_all (one batched solve, no device sync) gives what _orthogonalize gives
    tensor by tensor, references counted alike, on random gradients with missing parts."""
    from unlearning.methods.interference_aware import _orthogonalize, orthogonalize_all

    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 3), (7,)]

    def maybe(shape):
        return torch.randn(shape, generator=gen) if torch.rand((), generator=gen) > 0.2 else None

    for _ in range(100):
        g = [maybe(s) for s in shapes]
        refs = [[maybe(s) for s in shapes] for _ in range(int(torch.randint(1, 4, (), generator=gen)))]
        out, count = orthogonalize_all(g, refs)
        expected = 0
        for j, gj in enumerate(g):
            if gj is None:
                assert out[j] is None
                continue
            want, n = _orthogonalize(gj, [r[j] for r in refs])
            expected += n
            assert out[j].shape == gj.shape and torch.allclose(out[j], want, atol=1e-5, rtol=1e-4)
        assert int(count) == expected
    # collinear references span one direction: only that one is removed (the per-tensor
    # QR also removes a spurious second direction here, see the note in benchmarks/README.md)
    g = [torch.tensor([1.0, 1.0, 0.0])]
    r = torch.tensor([-1.0, 0.0, 0.0])
    out, count = orthogonalize_all(g, [[r], [2 * r]])
    assert torch.allclose(out[0], torch.tensor([0.0, 1.0, 0.0])) and int(count) == 2
    assert orthogonalize_all([None, None], [[r, None]])[0] == [None, None]


def test_bad_configuration_is_refused_before_any_work(memorised, monkeypatch):
    from unlearning.methods import interference_aware

    model, train, test = memorised
    cells = [(train.instance_ids[0], t) for t in TASKS]

    def no_shadows(*a, **kw):
        raise AssertionError("a configuration error must be raised before the calibration trains shadows")

    monkeypatch.setattr(interference_aware, "shadow_scores", no_shadows)
    for bad in ({"orthogonalize": "twice"}, {"orthogonalize_impl": "fast"},
                {"orthogonalize_impl": "batched", "orthogonalize": "iterate"}, {"optimizer": "rmsprop"}, {"betas": 0.9},
                {"tau": {"segmentation": 1.0}}, {"tau": {t: -1.0 for t in TASKS}}, {"tau": 0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            get_method("interference_aware")(model, _data(train, test, cells),
                                             {"steps": 1, "shadow_recipe": {"epochs": 1}, **bad})
    _, log = get_method("interference_aware")(model, _data(train, test, cells), {"steps": 3, "orthogonalize": "iterate"})
    assert log["steps"] == 3


def test_distill_loss_on_hand_computed_predictions():
    """Per task, the mean over supervised samples of the per-pixel distance to the teacher
    (segmentation: KL(teacher ‖ student) of the class distributions; normals: 1 − cosine;
    depth: absolute difference), summed over tasks."""
    from math import log

    from unlearning.methods.interference_aware import distill_loss

    has = {t: torch.tensor([True, False]) for t in TASKS}  # the second sample is not supervised
    seg_t = torch.zeros(2, 2, 2, 2)  # uniform teacher over two classes
    seg_s = torch.zeros(2, 2, 2, 2)
    seg_s[:, 0] = log(3.0)  # student: (0.75, 0.25) at every pixel
    depth_t, depth_s = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    depth_s[1] = 100.0  # unsupervised: must not count
    normal_t = torch.zeros(2, 3, 2, 2)
    normal_t[:, 2] = 1.0
    normal_s = torch.zeros(2, 3, 2, 2)
    normal_s[:, 0] = 1.0  # orthogonal to the teacher: distance 1
    kl = 0.5 * log(0.5 / 0.75) + 0.5 * log(0.5 / 0.25)
    pred = {"segmentation": seg_s, "depth": depth_s, "normal": normal_s}
    teacher = {"segmentation": seg_t, "depth": depth_t, "normal": normal_t}
    assert float(distill_loss(pred, teacher, has)) == pytest.approx(kl + 1.0 + 1.0, rel=1e-5)
    assert float(distill_loss({"depth": depth_t}, {"depth": depth_t}, has)) == 0.0
    none = {t: torch.tensor([False, False]) for t in TASKS}
    assert float(distill_loss(pred, teacher, none)) == 0.0  # no supervised cell: no term


def test_nearest_retained_ranks_by_feature_similarity():
    from unlearning.methods.interference_aware import nearest_retained

    angle = {"f0": 0.0, "f1": 1.5, "a": 0.1, "b": 0.3, "c": 1.4, "d": 3.0}
    feats = {i: torch.tensor([torch.cos(torch.tensor(v)), torch.sin(torch.tensor(v))]) for i, v in angle.items()}
    candidates = ["a", "b", "c", "d"]
    assert nearest_retained(feats, ["f0"], candidates, 2) == ["a", "b"]
    # per forgotten instance in order, by rank; shared neighbours once
    assert nearest_retained(feats, ["f0", "f1"], candidates, 2) == ["a", "b", "c"]
    assert nearest_retained(feats, ["f1"], candidates, 9) == ["c", "b", "a", "d"]  # k capped at the candidates
    assert nearest_retained(feats, ["f0"], [], 2) == [] and nearest_retained(feats, ["f0"], candidates, 0) == []


def test_nearest_references_exclude_the_forgotten_instances(memorised):
    """In partial mode the forgotten instances stay in the retain set (their other tasks);
    they are their own reference there, never their own nearest neighbours."""
    model, train, test = memorised
    ids = train.instance_ids[:3]
    cells = [(i, "depth") for i in ids]
    _, log = get_method("interference_aware")(model, _data(train, test, cells), {"steps": 1, "n_nearest": 2})
    assert log["retain_references"] == ["own_retained_cells", "nearest", "random"]
    assert 2 <= len(log["nearest_retained"]) <= 6 and not set(log["nearest_retained"]) & set(ids)


def test_a_job_that_trains_shadow_models_reports_their_progress(memorised):
    """The shadow calibration (``shadow_recipe``) trains (1 + T) x folds models before the
    first forget step: the job's progress moves through them (it stayed at 0 until the
    method's first step), rises monotonically and ends at 1. A second job on the same
    cache trains nothing and gives the method the whole bar again."""
    from unlearning.job import run_unlearning_job
    from unlearning.methods.interference_aware import prepare_share, shadow_training_steps

    model, train, test = memorised
    recipe = {"epochs": 2, "batch_size": 8, "lr": 5e-3, "width": 8, "depth": 2, "head_width": 8, "seed": 0}
    config = {"steps": 4, "shadow_recipe": recipe, "shadow_folds": 2}
    # 2 folds x (1 + 3 tasks) shadows x 2 epochs x 2 batches of 8
    assert shadow_training_steps(len(train), len(TASKS), recipe, 2) == 2 * 4 * 2 * 2
    cache: dict = {}
    seen: list[float] = []
    run_unlearning_job(model, train, test, [(train.instance_ids[0], "depth")], config=config, cache=cache,
                       progress=seen.append)
    share = 32 / (32 + 4 + DEFAULTS["repair_steps"])
    assert seen == sorted(seen) and seen[-1] == 1.0
    during_shadows = [f for f in seen if 0 < f < 0.9 * share - 1e-9]
    assert len(during_shadows) >= 16  # one per shadow training step (a full shadow trains on 8 images: 2 steps)
    again: list[float] = []
    data = UnlearnData(train, [(train.instance_ids[1], "depth")], train.without([(train.instance_ids[1], "depth")]),
                       heldout=test, cache=cache["engine"])
    assert prepare_share(model, data, config) == 0.0  # cached: nothing left to train
    run_unlearning_job(model, train, test, [(train.instance_ids[1], "depth")], config=config, cache=cache,
                       progress=again.append)
    assert again == sorted(again) and again[0] >= 0.9 / (4 + DEFAULTS["repair_steps"]) - 1e-9  # a method step


def test_what_is_cached_from_held_out_data_is_keyed_by_which_data(memorised):
    """A per-version cache shared by jobs given other held-out data of the same size (a
    reference of their own): keyed by the length alone, the second read the first's losses
    and levels."""
    from unlearning.methods.interference_aware import heldout_losses, refresh_subset

    model, train, test = memorised
    other = random_dataset(len(test), 7, prefix="r")
    cache: dict = {}
    cells = [(train.instance_ids[0], "depth")]
    first = heldout_losses(model, _data(train, test, cells, cache=cache))
    second = heldout_losses(model, _data(train, other, cells, cache=cache))
    assert not torch.equal(first["depth"], second["depth"])
    assert torch.equal(second["depth"], heldout_losses(model, _data(train, other, cells))["depth"])
    a = refresh_subset(model, _data(train, test, cells, cache=cache), 4)
    b = refresh_subset(model, _data(train, other, cells, cache=cache), 4)
    assert not torch.equal(a[1]["depth"], b[1]["depth"])


def test_infinite_losses_rank_last_and_do_not_make_a_level_nan():
    """A cell whose prediction is not finite has an infinite loss (unlearning.losses): it ranks
    with the highest, not below them, and a quantile of held-out losses holding one is a
    number (torch.quantile interpolating towards an infinity gave NaN, a τ that stops the pull)."""
    from unlearning.methods.interference_aware import levels, loss_ranks

    inf, nan = float("inf"), float("nan")
    assert loss_ranks(torch.tensor([1.0, 2.0, inf, inf])).tolist() == [0.125, 0.375, 0.75, 0.75]
    ranks = loss_ranks(torch.tensor([inf, nan, 1.0]))
    assert ranks[0] == 0.75 and ranks[1].isnan() and ranks[2] == 0.25
    tau = levels(torch.tensor([1.0, 2.0, inf, inf, nan]), torch.tensor([0.9, 0.5, 0.0]))
    assert tau.tolist() == [2.0, 2.0, 1.0]
    assert levels(torch.tensor([inf, nan]), torch.tensor([0.5])).isnan().all()


def test_span_basis_of_more_references_than_elements():
    """A 2-element tensor (a width-2 GroupNorm, a binary head's bias) with three conflicting
    references: QR's R has two diagonal entries for three norms, and the check crashed."""
    from unlearning.methods.interference_aware import _span_basis

    a = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    q = _span_basis(a)
    assert q.shape == (2, 2) and torch.allclose(q.T @ q, torch.eye(2), atol=1e-6)
    one = _span_basis(torch.tensor([[1.0, 2.0, -1.0]]))
    assert one.shape == (1, 1) and abs(float(one[0, 0])) == pytest.approx(1.0)


def test_interference_aware_configurations_that_cannot_run_are_refused():
    from unlearning.methods.params import config_problems

    assert any("shadow_folds" in p for p in config_problems("interference_aware", {"shadow_folds": 1}))
    assert any("max_norm" in p for p in config_problems("interference_aware", {"max_norm": 0.0, "optimizer": "sgd"}))
    assert config_problems("interference_aware", {"shadow_folds": 2, "max_norm": 0.5}) == []


def test_heads_only_partial_leaves_a_full_erasure_to_the_shared_layers_too(memorised):
    """The instance's depth was erased before; erasing its other tasks now takes it out of the
    data (full mode), and the shared layers were frozen all the same (the option was gated on
    the job's protected tasks, not on each instance's mode)."""
    model, train, test = memorised
    earlier = train.without([("i0", "depth")])
    cells = [("i0", "segmentation"), ("i0", "normal")]
    data = UnlearnData(earlier, cells, earlier.without(cells), heldout=test)
    unlearned, log = get_method("interference_aware")(model, data, {"steps": 5, "heads_only_partial": True})
    before, after = model.state_dict(), unlearned.state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before if not n.startswith("heads."))
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("heads.depth."))
    assert all(n.startswith("heads.depth.") for n in log["frozen_parameters"])


def test_repairing_the_protected_heads_leaves_frozen_shared_layers_frozen(memorised):
    model, train, test = memorised
    cells = [(i, "depth") for i in train.instance_ids[:3]]
    shared = [n for n in model.state_dict() if not n.startswith("heads.")]
    for cfg, moved_heads in (({"steps": 3, "repair_steps": 3, "repair_protected_heads": True,
                               "heads_only_partial": True}, True),
                             ({"steps": 3, "repair_steps": 0, "repair_protected_heads": True,
                               "heads_only_partial": True}, False)):
        unlearned, log = get_method("interference_aware")(model, _data(train, test, cells), cfg)
        before, after = model.state_dict(), unlearned.state_dict()
        assert all(torch.equal(before[n], after[n]) for n in shared)  # the repair trained them too
        protected = [n for n in before if n.startswith(("heads.segmentation.", "heads.normal."))]
        assert any(not torch.equal(before[n], after[n]) for n in protected) == moved_heads
        # the log names what no step moved (it said [] whenever the option was set)
        params = {n for n, _ in model.named_parameters()}
        assert set(log["frozen_parameters"]) == {n for n in params if not n.startswith("heads.")} | (
            set() if moved_heads else {n for n in params if n.startswith(("heads.segmentation.", "heads.normal."))})


def test_progress_ends_at_one_when_settling_ends_early(memorised):
    """A cell just below its level: it gets there in a few steps, settling ends after
    settle_steps, far below the step budget, and the method's progress used to stop there
    (0.025). A cell inside its band from the start: nothing to do, progress 1 too."""
    from unlearning.losses import per_sample_losses

    model, train, test = memorised
    loss = float(per_sample_losses(model, train, [0])["depth"][0])
    for level, nothing in ((loss * 1.02, False), (loss / 1.05, True)):
        seen = []
        data = _data(train, test, [("i0", "depth")], progress=seen.append)
        _, log = get_method("interference_aware")(model, data, {"steps": 200, "settle_steps": 2, "repair_steps": 3,
                                                                "tau": {"depth": level}})
        assert log["nothing_to_forget"] is nothing and log["steps"] < 200
        assert seen[-1] == 1.0 and seen == sorted(seen)
        if not nothing:
            assert 0 < log["steps"] and seen[-2] < 0.5  # ended early


def test_what_is_cached_from_the_training_data_is_keyed_by_its_cells(memorised):
    """The features and the task subspaces were keyed by the training set's size: a job with
    one instance erased in place of another found no features for its own instances, and a
    dataset with a cell erased since read subspaces that cell's gradients had shaped."""
    from unlearning.methods.interference_aware import representation
    from unlearning.projection import cached_subspaces

    model, train, test = memorised
    cache: dict = {}
    first, second = train.without([("i0", t) for t in train.tasks]), train.without([("i1", t) for t in train.tasks])
    assert len(first) == len(second)
    representation(model, UnlearnData(first, [("i2", "depth")], first, heldout=test, cache=cache))
    feats = representation(model, UnlearnData(second, [("i2", "depth")], second, heldout=test, cache=cache))
    assert "i0" in feats and "i1" not in feats  # second's own instances
    a = cached_subspaces(model, train, cache, 0.5, 4)
    partly = train.without([("i3", "depth")])
    assert len(partly) == len(train) and cached_subspaces(model, partly, cache, 0.5, 4) is not a
    assert cached_subspaces(model, train, cache, 0.5, 4) is a  # the same cells: the cached entry


def test_held_out_data_without_a_forgotten_tasks_labels_is_refused_not_a_silent_no_op(memorised):
    """No finite held-out loss of a task gave it a NaN level; its cells got weight 0, the job
    took settling steps only and reported every cell at its level, with nothing forgotten."""
    from unlearning.data.base import MultiTaskDataset

    model, train, test = memorised
    unlabelled = MultiTaskDataset("tiny", list(test.tasks), test.images,
                                  {**test.targets, "depth": torch.zeros_like(test.targets["depth"])},
                                  test.instance_ids, num_classes=test.num_classes)  # depth 0: invalid everywhere
    cells = [(train.instance_ids[0], "depth"), (train.instance_ids[1], "segmentation")]
    with pytest.raises(ValueError, match=r"no labelled cell \(no finite loss\) of the forgotten task\(s\) \['depth'\]"):
        get_method("interference_aware")(model, _data(train, unlabelled, cells), {"steps": 2})
    # fixed levels need no held-out labels, and the other tasks' levels come from labelled data
    get_method("interference_aware")(model, _data(train, unlabelled, cells),
                                     {"steps": 2, "tau": {"depth": 0.5, "segmentation": 1.0}})
    get_method("interference_aware")(model, _data(train, unlabelled, [cells[1]]), {"steps": 2})


def test_shadow_scores_and_ssd_importances_are_keyed_by_the_training_cells(memorised):
    """Both were keyed by counts alone: a training set with another instance erased read the
    shadow table that still scored the erased one, and SSD's importances of data that held it."""
    from unlearning.methods.interference_aware import shadow_scores
    from unlearning.methods.ssd import train_importance

    model, train, test = memorised
    recipe = {"epochs": 1, "batch_size": 8, "lr": 5e-3, "width": 8, "depth": 2, "head_width": 8, "seed": 0}
    cache: dict = {}
    first, second = train.without([("i0", t) for t in train.tasks]), train.without([("i1", t) for t in train.tasks])
    a = shadow_scores(model, UnlearnData(first, [("i2", "depth")], first, heldout=test, cache=cache), recipe, 2, 0)
    b = shadow_scores(model, UnlearnData(second, [("i2", "depth")], second, heldout=test, cache=cache), recipe, 2, 0)
    assert "i1" in a["full"] and "i1" not in b["full"] and "i0" in b["full"]
    ia = train_importance(model, UnlearnData(first, [("i2", "depth")], first, heldout=test, cache=cache), len(first))
    ib = train_importance(model, UnlearnData(second, [("i2", "depth")], second, heldout=test, cache=cache), len(first))
    assert ia is not ib and any(not torch.equal(ia[k], ib[k]) for k in ia)


def test_shadow_scores_of_one_training_instance_train_the_shadows_that_can(memorised):
    """Its fold is the whole training set: the full-erasure shadow had nothing to train on,
    and every job of a calibrated model on such a dataset failed."""
    from unlearning.methods.interference_aware import shadow_scores

    model, train, test = memorised
    one = train.without([(i, t) for i in train.instance_ids[1:] for t in train.tasks])
    assert len(one) == 1
    recipe = {"epochs": 1, "batch_size": 8, "lr": 5e-3, "width": 8, "depth": 2, "head_width": 8, "seed": 0}
    scores = shadow_scores(model, UnlearnData(one, [], one, heldout=test), recipe, 4, 0)
    assert scores["full"] == {} and scores["shadows"] == 1 + len(TASKS)
    assert set(scores["partial"]) == set(one.instance_ids) and set(scores["partial"]["i0"]) == set(TASKS)


def test_a_retain_reference_averages_its_task_loss_over_measured_cells(memorised):
    """A supervised cell whose target is all invalid (depth 0 everywhere) has no loss: it
    added a fake 0 to its task's mean, where training and the baselines' retain loss leave
    it out."""
    from unlearning.methods.interference_aware import RetainReference
    from unlearning.methods.loops import retain_loss

    model, train, _ = memorised
    targets = {t: v.clone() for t, v in train.targets.items()}
    targets["depth"][[0, 1, 2, 3]] = 0.0
    blank = MultiTaskDataset(train.name, train.tasks, train.images, targets, train.instance_ids, train.num_classes)
    batch = blank.batch(list(range(8)))
    reference = RetainReference("random", batch, None, list(train.tasks))
    assert torch.allclose(reference.loss(model, 0.0), retain_loss(model, batch))
    assert reference.measured["depth"].tolist() == [False] * 4 + [True] * 4


def test_a_retain_gradient_that_is_not_finite_is_a_divergence_named_so():
    from unlearning.methods.base import UnlearningDiverged
    from unlearning.methods.interference_aware import _orthogonalize

    g = torch.tensor([1.0, 0.0, 0.0])
    with pytest.raises(UnlearningDiverged, match="retain reference's gradient is not finite"):
        _orthogonalize(g, [torch.tensor([-float("inf"), 1.0, 0.0]), torch.tensor([-1.0, 1.0, 0.0])])


def test_a_retain_reference_with_nothing_measured_is_left_out_without_distillation(memorised):
    """The forgotten instance's retained cells, all unlabelled, gave a retain reference no loss
    (distill_weight 0): the job died on None.detach() instead of running."""
    model, train, test = memorised
    targets = {t: v.clone() for t, v in train.targets.items()}
    targets["segmentation"][0] = -1  # i0: no labelled pixel in its retained tasks
    targets["normal"][0] = 0.0
    unlabelled = MultiTaskDataset("tiny", train.tasks, train.images, targets, list(train.instance_ids),
                                  num_classes=train.num_classes)
    cells = [("i0", "depth")]
    cfg = {"steps": 3, "distill_weight": 0.0, "tau": {"depth": 10.0}, "n_nearest": 0, "random_batch": 0}
    unlearned, _ = get_method("interference_aware")(model, _data(unlabelled, test, cells), cfg)
    before, after = model.state_dict(), unlearned.state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("heads.depth."))  # it stepped
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith(("heads.segmentation.",
                                                                                 "heads.normal.")))
