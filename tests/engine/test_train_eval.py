"""Training (seeded, supervised cells only) and evaluation of an unlearning job, on tiny random data."""
import copy
import json
import math
import re

import pytest
import torch

from unlearning.data import canonical_spec, dataset_key, load_splits
from unlearning.data.base import MultiTaskDataset
from unlearning.evaluate import (EvalContext, evaluate_unlearning, forget_cell_losses, metrics_and_losses, retained_sample,
                                 task_metrics)
from unlearning.losses import cell_losses, measured_cells, per_sample_losses, supervised_loss
from unlearning.metrics import mia_auc
from unlearning.model import load_model
from unlearning.train import TrainConfig, build_model, main, resolve_device, train_model

TASKS = ["segmentation", "depth", "normal"]
TINY = dict(width=8, depth=2, head_width=8, batch_size=4, lr=5e-3)


def random_dataset(n: int, seed: int, prefix: str = "i", h: int = 8, w: int = 8, classes: int = 3) -> MultiTaskDataset:
    """Random images and targets with the formats' invalid markers (-1 label, 0 depth, zero normal)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, h, w, generator=g)
    seg = torch.randint(0, classes, (n, h, w), generator=g)
    seg[:, 0, 0] = -1
    depth = torch.rand(n, 1, h, w, generator=g) * 3 + 0.5
    depth[:, :, 0, 1] = 0.0
    normal = torch.nn.functional.normalize(torch.randn(n, 3, h, w, generator=g), dim=1)
    normal[:, :, 1, 0] = 0.0
    ids = [f"{prefix}{k}" for k in range(n)]
    return MultiTaskDataset("random", TASKS, images, {"segmentation": seg, "depth": depth, "normal": normal}, ids, classes)


def mean_train_loss(model, data) -> float:
    losses = per_sample_losses(model, data)
    return sum(float(v.nanmean()) for v in losses.values())


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained to memorise 8 random instances, with its held-out set."""
    train, test = random_dataset(8, 0), random_dataset(12, 1, prefix="t")
    cfg = TrainConfig(epochs=60, seed=0, **TINY)
    model = train_model(train, cfg, progress=False, device="cpu")
    return train, test, cfg, model


# --- training ------------------------------------------------------------------------


def test_training_reduces_the_loss_and_memorises(trained):
    train, test, cfg, model = trained
    initial = build_model(train, cfg)  # the same seeded initialisation train_model started from
    before, after = mean_train_loss(initial, train), mean_train_loss(model, train)
    assert after < 0.6 * before
    # random targets: what is learned is memorised, so the loss attack tells members apart
    members, nonmembers = per_sample_losses(model, train), per_sample_losses(model, test)
    assert mia_auc(members, nonmembers) > 0.9


def test_training_is_deterministic_per_seed_on_cpu():
    data = random_dataset(6, 3)
    cfg = TrainConfig(epochs=2, seed=7, **TINY)
    a = train_model(data, cfg, progress=False, device="cpu").state_dict()
    b = train_model(data, cfg, progress=False, device="cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_model(data, TrainConfig(epochs=2, seed=8, **TINY), progress=False, device="cpu").state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_on_progress_reports_fractions_up_to_one():
    seen = []
    train_model(random_dataset(5, 4), TrainConfig(epochs=2, **TINY), progress=False, device="cpu", on_progress=seen.append)
    assert len(seen) == 2 * 2  # 5 instances, batches of 4: two steps per epoch
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_erased_cells_give_their_head_no_gradient():
    data = random_dataset(2, 5)
    model = build_model(data, TrainConfig(**TINY))
    batch = data.batch([0, 1])
    batch.has["depth"] = torch.tensor([False, False])
    supervised_loss(cell_losses(model, batch), batch.has).backward()
    for p in model.head_parameters("depth"):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert any(torch.count_nonzero(p.grad) > 0 for p in model.head_parameters("normal"))

    # a mixed batch: the erased cell of instance 1 adds nothing, so the depth head's gradient
    # is that of instance 0 alone (GroupNorm keeps samples independent)
    def depth_head_grad(indices, has_depth):
        model.zero_grad()
        b = data.batch(indices)
        b.has["depth"] = torch.tensor(has_depth)
        supervised_loss(cell_losses(model, b), b.has).backward()
        return [p.grad.clone() for p in model.head_parameters("depth")]

    mixed = depth_head_grad([0, 1], [True, False])
    alone = depth_head_grad([0], [True])
    assert all(torch.allclose(m, a, atol=1e-6) for m, a in zip(mixed, alone))


def test_supervised_loss_ignores_whatever_an_unsupervised_cell_holds():
    has = {"depth": torch.tensor([True, False, True]), "normal": torch.tensor([False, False, False])}
    for bad in (float("inf"), float("nan")):
        losses = {"depth": torch.tensor([1.0, bad, 2.0]), "normal": torch.tensor([bad, 0.5, 0.5])}
        assert float(supervised_loss(losses, has)) == pytest.approx(1.5)  # (1 + 2) / 2, normal adds 0


def test_a_supervised_cell_without_a_valid_pixel_trains_as_if_it_were_erased():
    """As in an npy dataset whose depth map is all 0 (invalid): its loss is 0 and it counted
    in the task's mean, shrinking the depth loss of every batch it fell in."""
    data = random_dataset(8, 2)
    data.targets["depth"][2].zero_()  # (random_dataset builds its own tensors)
    batch = data.batch([1, 2])
    losses = {"depth": cell_losses(build_model(data, TrainConfig(**TINY)), batch, ["depth"])["depth"].detach()}
    assert float(losses["depth"][1]) == 0.0 and bool(batch.has["depth"].all())
    assert float(supervised_loss(losses, measured_cells(batch, ["depth"]))) == float(losses["depth"][0])
    assert float(supervised_loss(losses, batch.has)) == float(losses["depth"][0]) / 2  # what training averaged

    cfg = TrainConfig(epochs=2, **TINY)
    blank = train_model(data, cfg, progress=False, device="cpu").state_dict()
    erased = train_model(data.without([("i2", "depth")]), cfg, progress=False, device="cpu").state_dict()
    assert all(torch.equal(blank[k], erased[k]) for k in blank)


def test_the_methods_retain_loss_skips_a_cell_without_a_valid_pixel():
    from unlearning.methods.loops import retain_loss

    data = random_dataset(3, 9)
    data.targets["depth"][1].zero_()
    model = build_model(data, TrainConfig(**TINY))
    batch = data.batch([0, 1, 2])
    without = data.without([("i1", "depth")]).batch([0, 1, 2])
    assert float(retain_loss(model, batch).detach()) == float(retain_loss(model, without).detach())


def test_train_model_leaves_the_head_of_a_fully_erased_task_untouched():
    data = random_dataset(6, 6)
    erased = data.without([(iid, "depth") for iid in data.instance_ids])
    cfg = TrainConfig(epochs=2, **TINY)
    start = build_model(erased, cfg)
    head = [p.detach().clone() for p in start.head_parameters("depth")]
    model = train_model(erased, cfg, model=start, progress=False, device="cpu")
    assert all(torch.equal(h, p) for h, p in zip(head, model.head_parameters("depth")))
    assert not all(torch.equal(a, b) for a, b in zip(build_model(erased, cfg).shared_parameters(), model.shared_parameters()))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            resolve_device("cuda")


def test_cli_writes_a_checkpoint_with_dataset_and_recipe(tmp_path, monkeypatch, capsys):
    import unlearning.data

    specs = []

    def fake_load_splits(spec, render_workers=1):
        specs.append(spec)
        return random_dataset(4, 8), random_dataset(3, 9, prefix="t")

    monkeypatch.setattr(unlearning.data, "load_splits", fake_load_splits)
    out = tmp_path / "ckpt"
    args = ["--dataset", "indoor", "--n-train", "4", "--epochs", "1", "--model-width", "8", "--model-depth", "2"]
    assert main(args + ["--head-width", "8", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert specs == [{"name": "indoor", "n_train": 4}]
    config = json.loads((out / "config.json").read_text())
    # recorded with every default written out: the checkpoint names the same data should the
    # renderer's defaults change, under the same dataset key
    assert config["dataset"] == {"name": "indoor", "n_train": 4, "n_test": 48, "height": 48, "width": 64, "seed": 0}
    assert dataset_key(config["dataset"]) == dataset_key({"name": "indoor", "n_train": 4})
    assert config["train"]["epochs"] == 1 and config["train"]["width"] == 8
    # one seed gives one model at one thread count only: recorded beside the recipe
    assert config["torch_threads"] == torch.get_num_threads()
    assert load_model(out).tasks == TASKS
    assert set(json.loads(capsys.readouterr().out)["test"]) == set(TASKS)


def write_npy_dataset(root, n_train: int = 4, n_val: int = 2, size: int = 16, depth_shift: float = 0.5) -> None:
    """A tiny cityscapes-layout folder (segmentation and depth .npy files)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for folder in ("image", "label", "depth"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((size, size, 3)).astype(np.float32))
            np.save(root / split / "label" / f"{i}.npy", rng.integers(-1, 7, (size, size)))
            np.save(root / split / "depth" / f"{i}.npy", (depth_shift + rng.random((size, size))).astype(np.float32))


def test_cli_records_an_absolute_root_so_the_checkpoint_names_its_data_from_anywhere(tmp_path, monkeypatch, capsys):
    """A relative --root used to be recorded as typed: `unlearning.unlearn --checkpoint`, which
    has no --root, read it against its own working directory, i.e. other data or none."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    write_npy_dataset(here / "data")
    write_npy_dataset(elsewhere / "data", depth_shift=5.0)  # same layout, other data
    monkeypatch.chdir(here)
    args = ["--dataset", "cityscapes", "--root", "./data/", "--epochs", "1", "--model-width", "8", "--model-depth",
            "2", "--head-width", "8", "--batch-size", "4", "--out", "ckpt", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    recorded = json.loads((here / "ckpt" / "config.json").read_text())["dataset"]
    assert recorded == {"name": "cityscapes", "root": str(here / "data"), "num_classes": 7, "limit": None}
    assert recorded == canonical_spec(recorded)
    monkeypatch.chdir(elsewhere)
    train, _ = load_splits(recorded)
    assert torch.equal(train.targets["depth"], load_splits({"name": "cityscapes", "root": str(here / "data")})[0]
                       .targets["depth"])
    assert float(train.targets["depth"].max()) < 2.0  # here's data, not elsewhere's


@pytest.mark.parametrize("progress", [True, False])
def test_cli_says_what_it_loads_and_renders_with_auto_workers(tmp_path, monkeypatch, capsys, progress):
    """Rendering the scenes took minutes with no output, in one process whatever their size."""
    import unlearning.data

    calls, load = [], unlearning.data.load_splits
    monkeypatch.setattr(unlearning.data, "load_splits", lambda spec, **kw: calls.append(kw) or load(spec, **kw))
    args = ["--dataset", "indoor", "--n-train", "4", "--n-test", "2", "--height", "16", "--width", "24", "--epochs",
            "1", "--model-width", "8", "--model-depth", "2", "--head-width", "8", "--device", "cpu",
            "--out", str(tmp_path / "out")]
    assert main(args + ([] if progress else ["--no-progress"])) == 0
    assert calls == [{"render_workers": "auto"}]  # the same tensors for any number of workers
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "scenes" in line or "instances" in line]
    if not progress:
        assert said == []
        return
    assert said[0] == "rendering 4 training and 2 test indoor scenes of 16x24 pixels ..."
    assert re.fullmatch(r"loaded 4 training and 2 test instances in [0-9]+\.[0-9] s", said[1])


def test_cli_num_classes_and_limit_reach_the_spec_of_a_file_dataset(tmp_path, capsys):
    """Standard Cityscapes has 19 classes, the loader's default 7: the CLI had no way to say
    so (the loader's error told to set num_classes in a spec the CLI builds itself)."""
    import numpy as np

    root = tmp_path / "cs"
    write_npy_dataset(root, n_train=4)
    label = np.load(root / "train" / "label" / "1.npy")
    label[2, 3] = 18
    np.save(root / "train" / "label" / "1.npy", label)
    args = ["--dataset", "cityscapes", "--root", str(root), "--epochs", "1", "--model-width", "8", "--model-depth",
            "2", "--head-width", "8", "--batch-size", "4", "--no-progress", "--device", "cpu"]

    assert main(args + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "label 18 but the dataset has 7 classes" in err and "--num-classes" in err
    assert not (tmp_path / "refused").exists()

    assert main(args + ["--num-classes", "19", "--limit", "3", "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    recorded = json.loads((tmp_path / "ckpt" / "config.json").read_text())["dataset"]
    assert recorded == {"name": "cityscapes", "root": str(root), "num_classes": 19, "limit": 3}
    model = load_model(tmp_path / "ckpt")
    assert model.config.tasks["segmentation"] == 19
    assert len(load_splits(recorded)[0]) == 3


# --- evaluation ----------------------------------------------------------------------


def test_task_metrics_skip_erased_cells(trained):
    train, _, _, model = trained
    erased = train.without([("i0", "depth")])
    m = task_metrics(model, erased)
    rest = task_metrics(model, train.subset(range(1, len(train))))
    assert m["depth"] == rest["depth"]  # instance 0's depth no longer counts
    assert m["segmentation"] == task_metrics(model, train)["segmentation"]  # its other cells still do
    assert m["depth"] != task_metrics(model, erased, only_supervised=False)["depth"]
    assert set(task_metrics(model, erased.select(["i0"]))) == {"segmentation", "normal"}


def test_metrics_and_losses_equal_the_two_separate_passes(trained):
    """A job scores the test set once for its metrics and its attack's non-members; the one
    pass must give exactly what task_metrics and per_sample_losses give, erased cells included."""
    train, test, _, model = trained
    erased = train.without([("i0", "depth"), ("i3", "normal"), ("i3", "segmentation")])
    for data in (test, erased, erased.select(["i3"]), erased.select(["i0", "i3"])):
        metrics, losses = metrics_and_losses(model, data, batch_size=3)
        assert metrics == task_metrics(model, data, batch_size=3)
        separate = per_sample_losses(model, data, batch_size=3)
        assert set(losses) == set(separate)
        for t in separate:
            assert torch.equal(losses[t].isnan(), separate[t].isnan())
            assert torch.equal(losses[t].nan_to_num(-1.0), separate[t].nan_to_num(-1.0))
    assert losses["depth"][0].isnan() and not losses["segmentation"][0].isnan()  # i0 keeps its other cells
    assert losses["normal"][1].isnan() and losses["segmentation"][1].isnan()


def test_retained_sample_is_seeded_and_excludes_forgotten(trained):
    train = trained[0]
    a = retained_sample(train, ["i1", "i2"], size=4, seed=0)
    assert a == retained_sample(train, ["i1", "i2"], size=4, seed=0)
    assert len(a) == 4 and not {"i1", "i2"} & set(a)
    assert len(retained_sample(train, ["i1"], size=100)) == len(train) - 1


def test_evaluate_unchanged_model_has_zero_uis_and_the_same_auc(trained):
    train, test, _, model = trained
    forget = [("i0", "depth"), ("i3", "segmentation"), ("i3", "depth"), ("i3", "normal")]
    report = evaluate_unlearning(model, model, train, forget, test, retrained=model, retained_sample_size=4)
    assert report["uis"] == 0.0 and report["uis_task"] == 0.0 and report["uis_inst"] == 0.0
    assert report["mia_auc"] == report["mia_auc_original"] == report["mia_auc_retrain"]
    assert report["forget_gap"] == 0.0 and report["uis_retrain"] == 0.0
    assert report["mode"] == "partial"
    keys = {(g["level"], g["task"], g["set"]) for g in report["groups"]}
    # i0 keeps segmentation and normal; i3 is forgotten in full: task-level groups for those two only
    assert {k for k in keys if k[0] == "task"} == {("task", "segmentation", "forgotten"), ("task", "normal", "forgotten")}
    assert {k for k in keys if k[0] == "inst"} == {("inst", t, s) for t in TASKS for s in ("retained", "test")}
    sizes = {(g["level"], g["task"], g["set"]): g["n"] for g in report["groups"]}
    assert sizes[("task", "normal", "forgotten")] == 1 and sizes[("inst", "depth", "retained")] == 4
    json.dumps(report)  # plain JSON for the worker and the benchmark


def test_the_forget_gap_from_the_gold_standards_losses_keeps_a_diverged_head(trained):
    """``retrained_forget_losses`` (the bench's gold standard, evaluated once) gives the gap the
    gold model would; a head whose loss on the forgotten cells is infinite makes it infinite
    (None): the bench rebuilt it from JSON-safe means, and dropped that task (gap 0.0)."""
    train, test, _, model = trained
    cells = [("i2", t) for t in TASKS]
    gold = forget_cell_losses(model, train, cells)
    with_model = evaluate_unlearning(model, model, train, cells, test, retrained=model, retained_sample_size=4)
    with_losses = evaluate_unlearning(model, model, train, cells, test, retained_sample_size=4,
                                      retrained_forget_losses=gold)
    assert with_losses["forget_gap"] == with_model["forget_gap"] == 0.0
    assert with_losses["mia_auc_retrain"] is None and with_losses["uis_retrain"] is None
    diverged = copy.deepcopy(model)
    with torch.no_grad():
        diverged.heads["depth"].out.bias.fill_(float("inf"))  # softplus(inf): an infinite depth
    report = evaluate_unlearning(model, diverged, train, cells, test, retained_sample_size=4,
                                 retrained_forget_losses=gold)
    assert report["forget_loss"]["unlearned"]["depth"] is None
    assert report["forget_loss"]["unlearned"]["segmentation"] is not None
    assert report["forget_gap"] is None


def test_evaluating_a_model_of_other_tasks_or_channels_names_it(trained):
    """It failed inside the model's forward (KeyError 'segmentation'; a convolution's channel error)."""
    from unlearning.model import ModelConfig, MultiTaskNet

    train, test, _, model = trained
    cells = [("i2", "depth")]
    other_tasks = MultiTaskNet(ModelConfig(tasks={"depth": 1, "normal": 3}, width=8, depth=2, head_width=8))
    with pytest.raises(ValueError, match=r"^the unlearned model: checkpoint does not match the dataset: model tasks"):
        evaluate_unlearning(model, other_tasks, train, cells, test)
    grey = MultiTaskNet(ModelConfig(tasks=dict(model.config.tasks), width=8, depth=2, head_width=8, in_channels=1))
    with pytest.raises(ValueError, match=r"^the original model: .*takes 1-channel images"):
        evaluate_unlearning(grey, model, train, cells, test)


def test_evaluate_full_mode_and_missing_retrain(trained):
    train, test, _, model = trained
    cells = [("i2", t) for t in TASKS] + [("i2", "depth")]  # a repeated request counts once
    report = evaluate_unlearning(model, model, train, cells, test)
    assert report["mode"] == "full" and report["uis_task"] == 0.0
    assert report["n_forget_cells"] == 3 and report["n_forget_instances"] == 1
    assert all(g["level"] == "inst" for g in report["groups"])
    assert report["mia_auc_retrain"] is None and report["forget_gap"] is None
    # one forgotten instance per task: the original's AUC is the mean of its ranks per task
    losses = per_sample_losses(model, train, [train.index_of("i2")])
    heldout = per_sample_losses(model, test)
    ranks = [mia_auc(losses[t], heldout[t]) for t in TASKS]
    assert report["mia_auc_original"] == pytest.approx(sum(ranks) / 3)


def test_evaluate_degrading_one_head_shows_in_its_groups_only(trained):
    train, test, _, model = trained
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        damaged.heads["depth"].out.bias += 2.0  # every depth prediction far too large
    context = EvalContext(model, train, test, retained_sample_size=4)
    report = evaluate_unlearning(model, damaged, train, [("i1", "segmentation")], test, context=context)
    d = {(g["level"], g["task"], g["set"]): g["degradation"] for g in report["groups"]}
    assert all(v == 0.0 for (_, t, _), v in d.items() if t != "depth")
    assert all(v > 0.0 for (_, t, _), v in d.items() if t == "depth")
    task_level = [v for k, v in d.items() if k[0] == "task"]
    assert report["uis_task"] == pytest.approx(sum(task_level) / len(task_level))
    assert report["uis"] == pytest.approx(sum(d.values()) / len(d))
    # the context is reused and refuses another original model
    again = evaluate_unlearning(model, damaged, train, [("i1", "segmentation")], test, context=context)
    assert again["uis"] == report["uis"]
    with pytest.raises(ValueError):
        evaluate_unlearning(damaged, damaged, train, [("i1", "segmentation")], test, context=context)


def test_a_per_version_context_charges_each_job_its_own_retained_sample(trained):
    """Benchmarks evaluate every job with ``per_version()``: what depends on the version
    alone is reused, and a request that hits the retained sample pays for the original
    model's pass over its own sample every time, whichever job ran before it."""
    train, test, _, model = trained
    context = EvalContext(model, train, test, retained_sample_size=4).warm()
    passes = []
    hook = model.register_forward_hook(lambda m, inputs, out: passes.append(int(inputs[0].shape[0])))
    try:
        def original_passes(ctx, cells):
            passes.clear()
            report = evaluate_unlearning(model, model, train, cells, test, context=ctx)
            return sum(passes), report

        hit = [(context.sample_ids()[0], "depth")]  # forgets a sampled instance: a sample of its own
        miss = [(next(i for i in train.instance_ids if i not in context.sample_ids()), "depth")]
        first, report = original_passes(context.per_version(), hit)
        second, again = original_passes(context.per_version(), hit)
        assert first == second and again == report  # the same work and result, whatever ran before
        assert original_passes(context.per_version(), miss)[0] == first - 4  # the version's sample is cached
        assert original_passes(context, hit)[0] == first  # the shared context keeps the hit sample...
        assert original_passes(context, hit)[0] == first - 4  # ...so a second job would find it
    finally:
        hook.remove()


def test_a_cell_without_a_labelled_pixel_is_not_measured(trained):
    """A supervised cell whose every pixel is invalid (depth 0, label -1) has no loss: its
    per-sample loss is NaN like an erased cell's, the membership attack and the metrics
    skip it, and an unlearning method's forget batch leaves it out."""
    from unlearning.evaluate import membership_auc
    from unlearning.methods.base import UnlearnData

    train, test, _, model = trained
    blank = copy.deepcopy(train)
    blank.targets["depth"][2].zero_()
    blank.targets["segmentation"][2].fill_(-1)
    losses = per_sample_losses(model, blank)
    assert losses["depth"][2].isnan() and losses["segmentation"][2].isnan() and not losses["normal"][2].isnan()
    assert torch.equal(losses["depth"][3:], per_sample_losses(model, train)["depth"][3:])
    # the attack on a set with the blank cell equals the attack without it (not a fake certain member)
    with_blank, _ = membership_auc(model, blank, [("i2", "depth"), ("i5", "depth")], test)
    without, _ = membership_auc(model, blank, [("i5", "depth")], test)
    assert with_blank == without
    # metrics: a task whose only cells are blank is left out, not reported as zeros
    assert set(task_metrics(model, blank.select(["i2"]))) == {"normal"}
    metrics, both = metrics_and_losses(model, blank)
    assert metrics == task_metrics(model, blank) and both["depth"][2].isnan()
    # the forget batch marks only cells with a label
    data = UnlearnData(train=blank, retain=blank.without([("i2", t) for t in TASKS]),
                       forget_cells=[("i2", t) for t in TASKS])
    batch = data.forget_batch()
    assert [bool(batch.has[t][0]) for t in TASKS] == [False, False, True]
    # the evaluation's forget losses (the bench's forget_gap reads them) are over the cells with a label
    ev = evaluate_unlearning(model, model, blank, [("i2", "depth"), ("i5", "depth")], test)
    alone = evaluate_unlearning(model, model, blank, [("i5", "depth")], test)
    assert ev["forget_loss"]["unlearned"]["depth"] == pytest.approx(alone["forget_loss"]["unlearned"]["depth"], rel=1e-6)
    assert math.isfinite(ev["forget_loss"]["unlearned"]["depth"])


def test_a_groups_n_counts_the_cells_its_metrics_read(trained):
    """``n`` of a group is the cells with a labelled pixel, which its metrics read; it counted
    the supervised ones, blank cells included."""
    train, test, _, model = trained
    blank = copy.deepcopy(test)
    blank.targets["depth"][:5].zero_()  # 5 of 12 test cells without a valid depth pixel
    report = evaluate_unlearning(model, model, train, [("i1", "segmentation")], blank, retained_sample_size=4)
    n = {(g["level"], g["task"], g["set"]): g["n"] for g in report["groups"]}
    assert n[("inst", "depth", "test")] == 7 and n[("inst", "normal", "test")] == 12


def test_a_head_whose_predictions_are_not_finite_is_not_scored_as_an_unlabelled_one(trained):
    """NaN marks a cell with nothing to measure; a NaN loss of a measured cell (a diverged
    head) is +inf, the worst loss, and a segmentation head with NaN logits has NaN metrics
    (argmax still picked a class), so UIS says the model is broken instead of dropping the
    cells or scoring a poor head."""
    train, test, _, model = trained
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.heads["segmentation"].out.bias.fill_(float("nan"))
    losses = per_sample_losses(broken, train)
    assert torch.isinf(losses["segmentation"]).all() and torch.isfinite(losses["depth"]).all()
    assert all(math.isnan(v) for v in task_metrics(broken, test)["segmentation"].values())
    report = evaluate_unlearning(model, broken, train, [("i1", "segmentation"), ("i1", "depth")], test,
                                 retained_sample_size=4)
    # strict JSON: the infinite forget loss is None (UIS, NaN, says why)
    assert math.isnan(report["uis"]) and report["forget_loss"]["unlearned"]["segmentation"] is None
    # the attack counts both cells, as for the original model: the broken cell ties every non-member
    assert report["mia_auc"] == pytest.approx((0.5 + mia_auc({"depth": per_sample_losses(broken, train.select(["i1"]))["depth"]},
                                                             {"depth": per_sample_losses(broken, test)["depth"]})) / 2)


def test_a_forgotten_task_the_attack_cannot_compare_is_named(trained, caplog):
    """No labelled held-out depth: the attack compares segmentation alone, and the report
    says so (``mia_tasks``), where its AUC silently stood for both forgotten tasks."""
    train, test, _, model = trained
    blank = copy.deepcopy(test)
    blank.targets["depth"].zero_()  # depth is labelled where it is > 0
    cells = [("i2", "segmentation"), ("i2", "depth")]
    with caplog.at_level("WARNING", logger="unlearning.evaluate"):
        report = evaluate_unlearning(model, model, train, cells, blank, retained_sample_size=4)
    assert report["mia_tasks"] == ["segmentation"]
    segmentation = mia_auc(forget_cell_losses(model, train, cells[:1])["segmentation"],
                           per_sample_losses(model, blank)["segmentation"])
    assert report["mia_auc"] == pytest.approx(segmentation)
    assert "forgotten task(s) ['depth'] have no labelled forgotten or held-out cell" in caplog.text
    full = evaluate_unlearning(model, model, train, cells, test, retained_sample_size=4)
    assert full["mia_tasks"] == ["depth", "segmentation"]
