"""Baseline unlearning methods on a tiny model that memorised random-ish data.

The model (width 8, depth 2, 16x16 images, 24 instances) is trained once per
module. Every method must raise the loss of the forgotten cells, leave the
caller's model untouched, and (where it promises so) leave the protected
tasks' heads bit-identical in a partial-task request.
"""
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

from unlearning.data.base import MultiTaskDataset
from unlearning.evaluate import membership_auc
from unlearning.losses import cell_losses, supervised_loss
from unlearning.methods import METHOD_NAMES, UnlearnData, get_method, method_defaults
from unlearning.model import ModelConfig, MultiTaskNet

BASELINES = [m for m in METHOD_NAMES if m not in ("interference_aware", "retrain")]
TASKS = ["segmentation", "depth", "normal"]
SIZE = 16

pytestmark = pytest.mark.usefixtures("torch_single_thread")  # tiny convs: threads only contend


def blocky(gen, n, channels, cells=4):
    """Random piecewise-constant maps (cells x cells blocks), so the tiny net can memorise them."""
    coarse = torch.rand(n, channels, cells, cells, generator=gen)
    return F.interpolate(coarse, size=(SIZE, SIZE), mode="nearest")


def random_dataset(n, seed, prefix):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=gen)
    seg = (blocky(gen, n, 1)[:, 0] * 3).long().clamp(max=2)
    seg[:, :2, :2] = -1  # some ignored pixels
    depth = 0.5 + 4.0 * blocky(gen, n, 1)
    normal = F.normalize(blocky(gen, n, 3) - 0.5, dim=1)
    targets = {"segmentation": seg, "depth": depth, "normal": normal}
    return MultiTaskDataset("tiny", TASKS, images, targets, [f"{prefix}{i}" for i in range(n)], num_classes=3)


def train_memorised(dataset, steps=300):
    torch.manual_seed(0)
    model = MultiTaskNet(ModelConfig.for_dataset(dataset, width=8, depth=2, head_width=8))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    batch = dataset.batch(range(len(dataset)))
    for _ in range(steps):
        opt.zero_grad()
        supervised_loss(cell_losses(model, batch), batch.has).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def world(torch_single_thread):
    train = random_dataset(24, seed=1, prefix="tr")
    heldout = random_dataset(8, seed=2, prefix="ho")
    model = train_memorised(train)
    return train, heldout, model


def request(world, cells, seed=0):
    train, heldout, _ = world
    return UnlearnData(train=train, forget_cells=cells, retain=train.without(cells), heldout=heldout, seed=seed)


def forget_cell_loss(model, data):
    """Mean loss over the forget cells, per task averaged over its cells, then over tasks."""
    batch = data.forget_batch()
    with torch.no_grad():
        losses = cell_losses(model, batch, data.forget_tasks)
    return sum(float(v[batch.has[t]].mean()) for t, v in losses.items()) / len(losses)


FULL = [(f"tr{i}", t) for i in (3, 11) for t in TASKS]
PARTIAL = [("tr5", "depth"), ("tr17", "depth")]


def test_memorised(world):
    """The fixture is meaningful: training cells fit far better than held-out ones."""
    train, heldout, model = world
    with torch.no_grad():
        tr = supervised_loss(cell_losses(model, train.batch(range(24))), train.batch(range(24)).has)
        ho = supervised_loss(cell_losses(model, heldout.batch(range(8))), heldout.batch(range(8)).has)
    assert float(tr) < 0.6 * float(ho)


# Methods without a forget signal (they forget only by drifting on the retain data)
# raise the forget cells' loss by less; they must still raise it.
MARGIN = {"finetune": 1.0, "l1_sparse": 1.0}


# The swept DEFAULTS are sized for the benchmark. On this tiny random-data model some
# methods need a longer or larger step (ssd: a wider selection, harder dampening) to carry
# a memorised cell past held-out ones (at their defaults the forget loss rises, but the
# attack's AUC stays near 1.0). The tiny model itself differs from CPU to CPU (other float
# kernels train other weights), so each value leaves a wide margin under the 0.95 bound on
# the machine it was set on: at the defaults gradient_ascent (5 steps) reached 0.958, ssd 1.0
# and pcgrad (60 steps) 0.938 on an AMD EPYC with AVX2 while passing on AVX512 machines.
# After the second sweep (lower learning rates for finetune and l1_sparse, a smaller salun
# mask) those three kept the memorised cells at AUC 1.0 here on the AVX2 machine.
TINY = {
    "finetune": {"lr": 1e-2},  # the first sweep's lr (the second chose 5e-3 at 120 steps)
    "gradient_ascent": {"steps": 10},
    "random_target": {"steps": 100, "lr": 0.01},
    # gamma 0.2 (the second sweep's) masked too little here; the extension's retain weight 3 holds
    # the memorised cells at AUC 1.0 on this tiny model (its default was 1 before)
    "salun": {"steps": 100, "lr": 0.01, "gamma": 0.3, "retain_weight": 1.0},
    "pcgrad": {"steps": 100},
    "scrub": {"lr": 0.003},  # its schedule is rounds of steps (an earlier "steps" here was no parameter of it)
    "ssd": {"alpha": 0.1, "lambda": 0.1},
    "l1_sparse": {"lr": 1e-2},  # the first sweep's lr (the second chose 5e-3)
}


def run(method, model, data):
    """The method with its DEFAULTS (the swept values), overridden by ``TINY``."""
    return get_method(method)(model, data, dict(TINY.get(method, {})))


def attack_auc(model, data):
    """The loss-threshold attack's AUC on the forget cells against the held-out cells."""
    return membership_auc(model, data.train, data.forget_cells, data.heldout)[0]


def raised(method, model, out, data):
    return forget_cell_loss(out, data) > forget_cell_loss(model, data) * MARGIN.get(method, 1.1)


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", BASELINES)
def test_full_request_raises_forget_loss_and_leaves_caller_model(world, method):
    model = world[2]
    data = request(world, FULL)
    original = state_copy(model)
    progress = []
    data.progress = progress.append
    out, log = run(method, model, data)
    assert out is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), f"{method} modified the caller's {k}"
    assert raised(method, model, out, data)
    before = attack_auc(model, data)
    assert before == 1.0  # memorised: every forget cell fits better than every held-out cell
    assert attack_auc(out, data) <= before - 0.05, f"{method} left the membership signal"
    assert log["forget_loss_after"] > log["forget_loss_before"]
    assert progress and progress[-1] == pytest.approx(1.0)
    assert all(torch.isfinite(p).all() for p in out.parameters())


@pytest.mark.parametrize("method", BASELINES)
def test_partial_request_forgets_the_forget_task(world, method):
    """The forgotten depth cells lose their membership signal. What the request does to
    the same instances' other tasks is interference (UIS measures it; the baselines make
    no promise about it), except that a method with PROTECTS_HEADS leaves their heads
    bit-identical."""
    model = world[2]
    data = request(world, PARTIAL)
    out, _ = run(method, model, data)
    assert raised(method, model, out, data)
    before = attack_auc(model, data)
    assert before == 1.0
    assert attack_auc(out, data) <= before - 0.05, f"{method} left the membership signal"
    module = importlib.import_module(f"unlearning.methods.{method}")
    if module.PROTECTS_HEADS:
        for task in ("segmentation", "normal"):
            for p0, p1 in zip(model.head_parameters(task), out.head_parameters(task)):
                assert torch.equal(p0, p1), f"{method} moved the protected {task} head"
        moved = any(not torch.equal(a, b) for a, b in zip(model.head_parameters("depth"), out.head_parameters("depth")))
        assert moved, f"{method} did not touch the forget task's head"


@pytest.mark.parametrize("method", BASELINES + ["interference_aware"])
def test_a_forget_cell_without_a_labelled_pixel_is_skipped_not_fatal(world, method):
    """A forget cell whose every pixel is invalid has nothing to forget (the forget batch
    leaves it out); a request with one beside a real cell still runs and forgets that one."""
    train, heldout, model = world
    blank = copy.deepcopy(train)
    blank.targets["depth"][5] = 0.0  # tr5: depth dropped out everywhere
    data = UnlearnData(train=blank, forget_cells=PARTIAL, retain=blank.without(PARTIAL), heldout=heldout)
    assert data.forget_batch().has["depth"].tolist() == [False, True]
    config = {"steps": 20, "tau_refresh": 0} if method == "interference_aware" else {}
    out, _ = get_method(method)(model, data, config)
    assert raised(method, model, out, data)


def test_methods_that_protect_heads():
    promised = {m for m in BASELINES if importlib.import_module(f"unlearning.methods.{m}").PROTECTS_HEADS}
    assert {"gradient_ascent", "salun", "ssd"} <= promised


def test_retrain_forgets_like_a_model_that_never_saw_the_cells(world):
    model = world[2]
    data = request(world, FULL)
    out, log = get_method("retrain")(model, data, {"train": {"epochs": 25, "lr": 5e-3, "batch_size": 8}})
    assert out is not model
    assert out.config == model.config
    assert log["retain_instances"] == 22
    assert forget_cell_loss(out, data) > 3 * forget_cell_loss(model, data)


def test_unknown_method_is_a_clear_key_error():
    with pytest.raises(KeyError, match="unknown unlearning method 'nope'.*gradient_ascent"):
        get_method("nope")


@pytest.mark.parametrize("method", BASELINES)
def test_defaults_are_bounded(method):
    """No baseline's default takes more steps than interference_aware's step budget (200);
    scrub: at most 5 min-steps a round, one pass over the retain data of the sweep and of
    `smoke` (64-80 instances, batches of 16)."""
    cfg = method_defaults(method)
    steps = cfg.get("steps", cfg.get("rounds", 0) * (cfg.get("min_steps") or 5) + cfg.get("max_rounds", 0))
    assert steps <= method_defaults("interference_aware")["steps"] == 200


def test_scrub_min_steps_are_a_pass_over_the_retain_data(world):
    """As in the reference code, each round's min-steps are one pass over the retained
    instances (``min_steps`` None); a number fixes them per round (1: one retain batch)."""
    from unlearning.methods.params import config_problems

    model = world[2]
    data = request(world, FULL)  # 22 retained instances
    progress = []
    data.progress = progress.append
    _, log = get_method("scrub")(model, data, {"rounds": 3, "max_rounds": 2, "batch_size": 8})
    assert log["min_steps_per_round"] == 3  # ceil(22 / 8)
    # 2 max-steps scheduled, the first makes no update: steps counts it, max_steps does not
    assert (log["max_steps"], log["skipped_max_steps"], log["min_steps"], log["steps"]) == (1, 1, 9, 11)
    assert len(progress) == 11 and progress[-1] == pytest.approx(1.0)
    _, log = get_method("scrub")(model, data, {"rounds": 3, "max_rounds": 2, "min_steps": 1})
    assert (log["max_steps"], log["skipped_max_steps"], log["min_steps"], log["steps"]) == (1, 1, 3, 5)
    assert config_problems("scrub", {"min_steps": 2}) == config_problems("scrub", {"min_steps": None}) == []
    assert config_problems("scrub", {"min_steps": 0}) and config_problems("scrub", {"min_steps": 1.5})


def test_scrub_first_max_step_leaves_the_student_as_the_teacher(world, monkeypatch):
    """The student starts as the teacher: D_f is 0 and its gradient rounding noise, which
    Adam's normalisation made a full-size step in random directions (most weights moved by
    up to lr in full mode). The rule's first max-step moves nothing; the min-steps do."""
    from unlearning.methods import loops

    model = world[2]
    data = request(world, FULL)
    copies, moved = [], []
    real = loops.working_copy
    monkeypatch.setattr(loops, "working_copy", lambda m, d: copies.append(real(m, d)) or copies[-1])
    original = state_copy(model)

    def after_step(fraction):
        student = copies[-1].state_dict()
        moved.append(any(not torch.equal(student[k], v) for k, v in original.items()))

    data.progress = after_step
    _, log = get_method("scrub")(model, data, {"rounds": 2, "max_rounds": 2, "min_steps": 1})
    assert (log["max_steps"], log["skipped_max_steps"], log["min_steps"], log["steps"]) == (1, 1, 2, 4)
    assert moved == [False, True, True, True]  # max (the student is the teacher), min, max, min


def test_scrub_max_rounds_that_cannot_forget_are_refused(world):
    """The first max-step makes no update, so max_rounds 1 gives the very weights of
    max_rounds 0 (retain training only) while its log said 1 max-step: the log counts the
    max-steps that updated, and the configuration check refuses both (and rounds 1, which
    leaves one max-step at most)."""
    from unlearning.methods.params import config_problems

    model = world[2]
    one, log_one = get_method("scrub")(model, request(world, FULL), {"rounds": 3, "max_rounds": 1, "min_steps": 1})
    none, log_none = get_method("scrub")(model, request(world, FULL), {"rounds": 3, "max_rounds": 0, "min_steps": 1})
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), none.state_dict().values()))
    assert (log_one["max_steps"], log_one["skipped_max_steps"], log_one["steps"]) == (0, 1, 4)
    assert (log_none["max_steps"], log_none["skipped_max_steps"], log_none["steps"]) == (0, 0, 3)
    _, log = get_method("scrub")(model, request(world, FULL), {"rounds": 3, "max_rounds": 8, "min_steps": 1})
    assert log["max_steps"] == 2  # min(rounds, max_rounds) - 1
    for bad in ({"max_rounds": 0}, {"max_rounds": 1}, {"rounds": 1}):
        (problem,) = config_problems("scrub", bad)
        assert "must be >= 2" in problem and "no update" in problem, problem
    assert config_problems("scrub", {"max_rounds": 2, "rounds": 2}) == []
    assert config_problems("scrub", {"max_rounds": 8, "rounds": 15}) == []  # the sweep's grid points


def test_pcgrad_projection_removes_the_conflict():
    from unlearning.methods.pcgrad import project_conflicting

    g_f, g_r = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    p_f, p_r, conflict = project_conflicting(g_f, g_r)
    assert conflict
    assert torch.allclose(p_f, torch.tensor([0.5, 0.5]))  # g_f minus its component along g_r
    assert torch.allclose(p_r, torch.tensor([0.0, 1.0]))  # g_r minus its component along g_f
    assert float(p_f @ g_r) == pytest.approx(0.0) and float(p_r @ g_f) == pytest.approx(0.0)
    same = torch.tensor([1.0, 1.0])
    assert project_conflicting(same, same)[2] is False


def test_ssd_dampening_rule():
    from unlearning.methods.ssd import dampen

    net = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[2.0, 2.0, 2.0]]))
    i_f = {"weight": torch.tensor([[1.0, 20.0, 0.0]])}
    i_d = {"weight": torch.tensor([[1.0, 1.0, 1.0]])}
    assert dampen(net, i_f, i_d, alpha=10.0, lam=1.0) == 1
    # only the middle weight has I_f > 10 I_d; it is scaled by I_d / I_f = 1/20
    assert torch.allclose(net.weight, torch.tensor([[2.0, 0.1, 2.0]]))
    # alpha below lambda: the first weight is selected (1 > 0.5 * 1) but its factor is
    # min(1, 1 * 1 / 1) = 1, so it is not dampened and not counted
    assert dampen(net, i_f, i_d, alpha=0.5, lam=1.0) == 1
    assert torch.allclose(net.weight, torch.tensor([[2.0, 0.005, 2.0]]))


def test_ssd_training_importance_is_prepared_once_per_version(world, monkeypatch):
    """``I_d`` depends only on the model version: ``prepare`` computes it on a copy (the
    caller's model and its gradients are untouched), requests with other seeds reuse it, and a
    request gives the same model whether or not it was prepared."""
    from unlearning.methods import prepare_method, ssd

    _, _, model = world
    alone, _ = get_method("ssd")(model, request(world, FULL, seed=3), {})
    cache: dict = {}
    before = state_copy(model)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    assert prepare_method("ssd", model, UnlearnData(world[0], FULL, world[0], heldout=world[1], cache=cache), {})
    assert [k[0] for k in cache] == ["ssd_train_importance"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    calls, fisher = [], ssd.fisher_diagonal

    def counted(*args, **kwargs):
        calls.append(1)
        return fisher(*args, **kwargs)

    monkeypatch.setattr(ssd, "fisher_diagonal", counted)
    outs = []
    for seed in (3, 4):
        data = request(world, FULL, seed=seed)
        data.cache = cache
        outs.append(get_method("ssd")(model, data, {})[0])
    assert len(calls) == 2  # the forget cells' importance per request; I_d never again
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), outs[0].state_dict().values()))


def test_random_targets_come_from_retained_cells(world):
    from unlearning.methods.loops import DonorTargets

    train = world[0]
    data = request(world, PARTIAL)
    batch = data.forget_batch()
    donors = DonorTargets(data.retain, ["depth"], torch.Generator().manual_seed(0))
    out = donors(batch)
    assert donors.dropped == []
    pool = data.retain.targets["depth"][data.retain.available[:, 1]]
    for row in out.targets["depth"]:
        assert any(torch.equal(row, cand) for cand in pool)
    own = train.targets["depth"][[train.index_of("tr5"), train.index_of("tr17")]]
    assert not any(torch.equal(a, b) for a, b in zip(out.targets["depth"], own))
    assert torch.equal(out.targets["segmentation"], batch.targets["segmentation"])


def test_unlabelled_cells_are_never_donors_and_a_task_without_donors_is_logged(world):
    """A donor with no labelled pixel would give its forget cell no loss at all; a
    forget task that has no labelled donor is left out and named in the log."""
    from unlearning.methods.loops import DonorTargets

    train, heldout, model = world
    # a copy: a partial erasure shares the fixture's tensors, which this test blanks
    retain = copy.deepcopy(train.without(PARTIAL))
    retain.targets["depth"][1:] = 0.0  # only the first retained instance keeps a depth label
    donors = DonorTargets(retain, ["depth"], torch.Generator().manual_seed(0))
    batch = request(world, PARTIAL).forget_batch()
    for _ in range(5):
        for row in donors(batch).targets["depth"]:
            assert torch.equal(row, retain.targets["depth"][0])

    retain.targets["depth"][:] = 0.0  # no labelled depth left to borrow
    data = UnlearnData(train=train, forget_cells=PARTIAL, retain=retain, heldout=heldout, seed=0)
    donors = DonorTargets(retain, ["depth"], torch.Generator().manual_seed(0))
    assert donors.dropped == ["depth"]
    assert not donors(data.forget_batch()).has["depth"].any()
    for name in ("random_target", "salun"):
        _, log = get_method(name)(model, data, {"steps": 1})
        assert log["no_donor_tasks"] == ["depth"], name


# A few steps: enough to move every method's copy, cheap enough to run for all of them.
FEW = {"steps": 2, "rounds": 2, "max_rounds": 2}  # scrub: one max-step that updates (the first makes none)


def few(method):
    return {k: v for k, v in FEW.items() if k in method_defaults(method)}


@pytest.mark.parametrize("method", BASELINES)
def test_a_frozen_model_is_unlearned_on_a_trainable_copy(world, method):
    """A caller may hand over a model frozen for serving (``requires_grad_(False)``): the
    method trains its own copy all the same (it used to fail in the first backward,
    "element 0 of tensors does not require grad"), and the caller's model stays frozen."""
    frozen = copy.deepcopy(world[2]).requires_grad_(False)
    data = request(world, PARTIAL)
    out, log = get_method(method)(frozen, data, few(method))
    assert not any(p.requires_grad for p in frozen.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(frozen.parameters(), out.parameters()))
    assert log["forget_loss_after"] != log["forget_loss_before"]


def test_salun_with_no_labelled_forget_cell_gives_back_the_model(world):
    """Every forget cell without a labelled pixel: no forget gradient, so no salient weight,
    and SalUn's masked update ``m ⊙ Δθ`` with ``m = 0`` leaves θ0 (it used to stop in the
    optimiser: "optimizer got an empty parameter list")."""
    train, heldout, model = world
    blank = copy.deepcopy(train)
    blank.targets["depth"][[train.index_of("tr5"), train.index_of("tr17")]] = 0.0
    data = UnlearnData(train=blank, forget_cells=PARTIAL, retain=blank.without(PARTIAL), heldout=heldout)
    progress = []
    data.progress = progress.append
    out, log = get_method("salun")(model, data, {})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), out.state_dict().values()))
    assert log["salient_weights"] == 0 and log["steps"] == 0
    assert progress[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("method", BASELINES)
def test_several_requests_in_one_job_are_seeded_and_spare_the_tasks_none_forgets(world, method):
    """Two partial requests on other tasks of other instances, one job: the same seed gives the
    same weights; a method with PROTECTS_HEADS leaves the head of the task no request names
    (segmentation) bit-identical and moves the heads of both forgotten tasks."""
    model = world[2]
    cells = [("tr5", "depth"), ("tr17", "normal")]
    a, _ = get_method(method)(model, request(world, cells, seed=1), few(method))
    b, _ = get_method(method)(model, request(world, cells, seed=1), few(method))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    if importlib.import_module(f"unlearning.methods.{method}").PROTECTS_HEADS:
        assert all(torch.equal(p0, p1) for p0, p1 in zip(model.head_parameters("segmentation"),
                                                         a.head_parameters("segmentation")))
        for task in ("depth", "normal"):
            assert any(not torch.equal(p0, p1) for p0, p1 in zip(model.head_parameters(task), a.head_parameters(task)))


@pytest.mark.parametrize("n, batch_size", [(22, 8), (24, 8), (5, 4), (3, 3), (7, 1)])
def test_retain_batches_hold_each_instance_once_and_draw_each_once_per_epoch(n, batch_size):
    """An epoch's short last batch was topped up from the next shuffle, which holds its
    instances too: the same instance could be in one batch twice."""
    from unlearning.methods import loops

    retain = random_dataset(n, 3, "r")
    batches = loops.RetainBatches(retain, batch_size, torch.Generator().manual_seed(2), "cpu")
    epochs = 4 * batch_size  # draws of a whole number of epochs and of batches
    drawn = []
    for _ in range(epochs * n // batch_size):
        ids = batches.next().index.tolist()
        assert len(ids) == batch_size and len(set(ids)) == batch_size, ids
        drawn += ids
    assert sorted(drawn) == sorted(list(range(n)) * epochs)
    again = loops.RetainBatches(retain, batch_size, torch.Generator().manual_seed(2), "cpu")
    assert [again.next().index.tolist() for _ in range(len(drawn) // batch_size)] == [
        drawn[i:i + batch_size] for i in range(0, len(drawn), batch_size)]


def test_a_number_no_float_holds_is_refused_by_name():
    """JSON reads 1000...0 (401 digits) as an int: math.isfinite raised OverflowError, and the
    CLIs (and UNLEARND_METHOD_CONFIG) printed a traceback."""
    from unlearning.methods.params import config_problems

    huge = 10**400
    assert config_problems("finetune", {"lr": huge}) == [
        f"finetune parameter 'lr' must be a finite number, got {huge!r}"]
    assert config_problems("interference_aware", {"betas": [huge, 0.9]})
    assert config_problems("interference_aware", {"tau": {"depth": huge}})
    scores = config_problems("interference_aware", {"shadow_scores": {"full": {"i0": {"depth": huge}}}})
    assert scores and "must be a score in [0, 1]" in scores[0]
    assert config_problems("finetune", {"steps": 2**70}) == []  # an int parameter takes any int in range
    # a library caller's keys need not be strings: named, not a TypeError from sorting them
    assert "has no parameter 'a', 1;" in config_problems("finetune", {1: 2, "a": 3})[0]


def test_retrain_refuses_an_architecture_it_would_ignore():
    """{"width": 999} passed the check and was ignored (the model's architecture is kept), while
    the job's recorded configuration said 999; in ``train`` (a manifest's recipe) it is read over."""
    from unlearning.methods.params import config_problems

    assert config_problems("retrain", {"width": 999}) == [
        "retrain parameter 'width' cannot be set: the retrained model has the deployed model's architecture "
        "(width, depth, head_width come from its checkpoint)"]
    assert config_problems("retrain", {"epochs": 2, "train": {"width": 16, "epochs": 5}}) == []
    assert "has no parameter 'width'" in config_problems("finetune", {"width": 8})[0]
    assert len(config_problems("finetune", {"width": 8})) == 1


@pytest.mark.parametrize("method", [m for m in BASELINES if "optimizer" in method_defaults(m)])
def test_sgd_momentum_is_a_parameter_of_every_method_with_an_optimizer(method):
    """make_optimizer read cfg["momentum"], but no DEFAULTS named it, so the check refused it and
    SGD's momentum was always 0.9: it is a parameter now, 0.9 by default, in [0, 1)."""
    from unlearning.methods import loops
    from unlearning.methods.params import config_problems

    assert method_defaults(method)["momentum"] == 0.9
    assert config_problems(method, {"optimizer": "sgd", "momentum": 0.0}) == []
    assert config_problems(method, {"optimizer": "sgd", "momentum": 0.5}) == []
    for bad in (1.0, -0.1, "high", None):
        assert config_problems(method, {"optimizer": "sgd", "momentum": bad}), bad
    param = [torch.nn.Parameter(torch.zeros(2))]
    cfg = {**method_defaults(method), "optimizer": "sgd"}
    assert loops.make_optimizer(param, cfg).param_groups[0]["momentum"] == 0.9
    assert loops.make_optimizer(param, {**cfg, "momentum": 0.3}).param_groups[0]["momentum"] == 0.3


def test_interference_aware_has_no_sgd_momentum():
    """Its sgd is clipped plain SGD (its own stepper): a momentum there would do nothing."""
    from unlearning.methods.params import config_problems

    assert "momentum" not in method_defaults("interference_aware")
    assert "has no parameter 'momentum'" in config_problems("interference_aware", {"momentum": 0.5})[0]


def test_grad_clip_zero_is_no_clipping_like_null():
    """``grad_clip`` 0 passes the check (>= 0) and, read as a truth value by the loops and the
    training recipe, turns clipping off: documented so, and the same update as null."""
    from unlearning.methods import loops
    from unlearning.methods.params import config_problems

    assert config_problems("finetune", {"grad_clip": 0}) == config_problems("finetune", {"grad_clip": None}) == []
    assert config_problems("retrain", {"train": {"grad_clip": 0}}) == []
    assert config_problems("finetune", {"grad_clip": -1})

    def one_step(clip):
        param = torch.nn.Parameter(torch.zeros(3))

        def fill(step):
            param.grad = torch.tensor([30.0, 40.0, 0.0])  # norm 50
            return {}

        loops.run_update_loop([param], 1, fill, torch.optim.SGD([param], lr=1.0), UnlearnData(None, [], None), clip)
        return param.detach()

    assert torch.equal(one_step(0), one_step(None)) and torch.equal(one_step(0), torch.tensor([-30.0, -40.0, 0.0]))
    assert torch.allclose(one_step(5.0), torch.tensor([-3.0, -4.0, 0.0]))


@pytest.mark.parametrize("method, config, why", [
    ("neggrad_plus", {"alpha": 1}, "alpha 1 is retain training with no forget signal"),
    ("neggrad_plus", {"alpha": 1.0}, "alpha 1 is retain training with no forget signal"),
    ("pcgrad", {"forget_weight": 0}, "forget_weight 0 is retain training with no forget signal"),
    ("pcgrad", {"forget_weight": 0.0}, "forget_weight 0 is retain training with no forget signal"),
])
def test_a_weight_that_removes_the_forget_signal_is_refused(method, config, why):
    """They ran and reported success with nothing to forget by: the check names them; the
    sweeps' grid values (alpha up to 0.99, forget_weight from 0.5) stay accepted."""
    from unlearning.methods.params import config_problems

    (problem,) = config_problems(method, config)
    assert why in problem, problem
    assert config_problems("neggrad_plus", {"alpha": 0.99}) == config_problems("neggrad_plus", {"alpha": 0}) == []
    assert config_problems("pcgrad", {"forget_weight": 0.5}) == []


QUICK = {"interference_aware": {"steps": 3, "tau_refresh": 0},
         "retrain": {"train": {"epochs": 1, "batch_size": 8}}}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_the_unlearned_model_comes_back_in_the_callers_mode(world, method, training):
    """The baselines handed back their working copy in training mode even for a caller's model
    in eval mode, interference_aware and retrain always in eval mode: each returns the
    caller's mode now, and leaves the caller's model in it."""
    model = copy.deepcopy(world[2]).train(training)
    out, _ = get_method(method)(model, request(world, PARTIAL), QUICK.get(method) or few(method))
    assert out is not model
    assert model.training is training
    assert all(m.training is training for m in out.modules()), method


def test_ssd_training_importance_is_not_shared_between_two_models_on_one_cache(world, monkeypatch):
    """The cache key named the training set and the subset's size, not the model: a second model
    on the same ``data.cache`` read the first one's ``I_d``. The key has a fingerprint of the
    weights now, equal for a model and its working copy, different for other weights."""
    from unlearning.methods import loops, prepare_method, ssd

    _, _, model = world
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3  # one weight
    assert ssd.weights_fingerprint(other) != ssd.weights_fingerprint(model)
    data = request(world, FULL)
    assert ssd.weights_fingerprint(loops.working_copy(model, data)) == ssd.weights_fingerprint(model)
    alone, _ = get_method("ssd")(other, request(world, FULL), {})
    cache: dict = {}
    assert prepare_method("ssd", model, UnlearnData(world[0], FULL, world[0], heldout=world[1], cache=cache), {})
    calls, fisher = [], ssd.fisher_diagonal

    def counted(*args, **kwargs):
        calls.append(1)
        return fisher(*args, **kwargs)

    monkeypatch.setattr(ssd, "fisher_diagonal", counted)
    data.cache = cache
    out, _ = get_method("ssd")(other, data, {})
    assert len(calls) == 2  # the other model's I_d (not the cached one) and its I_f
    assert len(cache) == 2
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), out.state_dict().values()))
    data = request(world, FULL)
    data.cache = cache
    get_method("ssd")(model, data, {})
    assert len(calls) == 3  # the prepared model: its I_d from the cache, only I_f computed
