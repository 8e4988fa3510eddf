"""run_unlearning_job: input validation with clear errors, and the metric keys it returns."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from unlearning.job import JobInputError, JobResult, run_unlearning_job
from unlearning.train import TrainConfig, train_model

from test_interference_aware import random_dataset

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def setup():
    train = random_dataset(12, 0)
    test = random_dataset(8, 1, prefix="t")
    model = train_model(train, TrainConfig(epochs=20, batch_size=6, width=8, depth=2, head_width=8), progress=False)
    return model, train, test


def test_job_returns_the_metric_keys(setup):
    model, train, test = setup
    seen = []
    cache: dict = {}
    cells = [("i0", "depth"), ("i1", "depth")]
    result = run_unlearning_job(model, train, test, cells, config={"steps": 5}, cache=cache, progress=seen.append)
    assert isinstance(result, JobResult)
    for key in ("uis", "uis_task", "uis_inst", "mia_auc", "mia_auc_original", "per_task", "method", "seconds", "forget_cells"):
        assert key in result.metrics, key
    assert result.metrics["method"] == "interference_aware"
    assert result.metrics["forget_cells"] == [["i0", "depth"], ["i1", "depth"]]
    assert set(result.metrics["per_task"]["test"]) == set(train.tasks)
    for key in ("uis", "uis_task", "uis_inst"):
        assert math.isfinite(result.metrics[key]) and result.metrics[key] >= 0, key
    for key in ("mia_auc", "mia_auc_original"):
        assert 0.0 <= result.metrics[key] <= 1.0, key
    assert result.metrics["mode"] == "partial" and result.metrics["mia_tasks"] == ["depth"]
    assert result.seconds > 0 and result.log["method"] == "interference_aware"
    assert seen and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    assert result.model is not model
    # the per-version cache is filled and reused: a second job on the same version has nothing to compute
    assert "eval_context" in cache and cache["engine"]
    context, engine = cache["eval_context"], dict(cache["engine"])
    run_unlearning_job(model, train, test, [("i2", "segmentation")], config={"steps": 2}, cache=cache)
    assert cache["eval_context"] is context
    assert all(cache["engine"][key] is value for key, value in engine.items()), "recomputed a cached entry"


def test_a_forget_cell_without_a_labelled_pixel_gives_strict_json_metrics(setup):
    # a valid input (its depth masked out everywhere) whose loss is undefined: the mean loss
    # of that task on the forget set was NaN, which strict JSON and jsonb refuse
    from unlearning.data.base import MultiTaskDataset

    model, train, test = setup
    targets = {t: v.clone() for t, v in train.targets.items()}
    targets["depth"][0] = 0.0  # depth 0 is no measurement
    masked = MultiTaskDataset(train.name, train.tasks, train.images, targets, train.instance_ids, train.num_classes)
    result = run_unlearning_job(model, masked, test, [("i0", "depth"), ("i1", "segmentation")], method="finetune",
                                config={"steps": 2})
    json.dumps(result.metrics, allow_nan=False)  # raises ValueError on NaN
    assert all(result.metrics["forget_loss"][name]["depth"] is None for name in ("original", "unlearned"))
    assert all(math.isfinite(result.metrics["forget_loss"][name]["segmentation"]) for name in ("original", "unlearned"))


def test_interference_aware_leaves_the_model_as_it_was_when_no_forget_cell_has_a_labelled_pixel(setup):
    # nothing was learned from such cells; the settling steps used to move the model anyway
    from unlearning.data.base import MultiTaskDataset

    model, train, test = setup
    targets = {t: v.clone() for t, v in train.targets.items()}
    targets["depth"][[0, 1]] = 0.0
    masked = MultiTaskDataset(train.name, train.tasks, train.images, targets, train.instance_ids, train.num_classes)
    result = run_unlearning_job(model, masked, test, [("i0", "depth"), ("i1", "depth")], config={"steps": 5})
    assert result.log["nothing_to_forget"] is True and result.log["steps"] == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in result.model.state_dict().items())
    assert result.metrics["uis"] == 0
    # one labelled cell among them is something to forget
    result = run_unlearning_job(model, masked, test, [("i0", "depth"), ("i2", "depth")], config={"steps": 5})
    assert result.log["nothing_to_forget"] is False and result.log["steps"] > 0


def test_full_task_job_with_a_baseline(setup):
    model, train, test = setup
    result = run_unlearning_job(model, train, test, [("i3", t) for t in train.tasks], method="finetune", config={"steps": 2})
    assert result.metrics["method"] == "finetune" and result.metrics["mode"] == "full"
    assert result.metrics["uis_task"] == 0


@pytest.mark.parametrize(
    "cells, message",
    [
        ([], "forget set is empty"),
        ([("i0", "albedo")], "unknown task 'albedo'"),
        ([("nobody", "depth")], "unknown instance 'nobody'"),
        (["i0"], "pair"),
        # one cell instead of a list of them: iterated, it was its strings ("got 'i0'"), or a
        # string's characters
        (("i0", "depth"), r"got one cell \('i0', 'depth'\): pass \[\('i0', 'depth'\)\]"),
        ("i0", r"a list of \(instance_id, task\) cells, got the string 'i0'"),
    ],
)
def test_bad_cells_are_refused(setup, cells, message):
    model, train, test = setup
    with pytest.raises(JobInputError, match=message):
        run_unlearning_job(model, train, test, cells)


def test_already_erased_cell_is_refused(setup):
    model, train, test = setup
    erased = train.without([("i4", "depth")])
    with pytest.raises(JobInputError, match="already erased"):
        run_unlearning_job(model, erased, test, [("i4", "depth")])
    # an instance erased from every task is gone from the data, and named as erased, not unknown
    gone = train.without([("i5", t) for t in train.tasks])
    assert "i5" not in gone.instance_ids
    with pytest.raises(JobInputError, match="instance 'i5' is already erased: every cell of it was erased"):
        run_unlearning_job(model, gone, test, [("i5", "depth")])
    with pytest.raises(JobInputError, match="already erased"):  # also after further erasures and subsets
        run_unlearning_job(model, gone.without([("i6", "depth")]).subset(range(4)), test, [("i5", "normal")])
    with pytest.raises(JobInputError, match="unknown instance 'nobody'"):
        run_unlearning_job(model, gone, test, [("nobody", "depth")])


def test_mismatched_checkpoint_is_refused(setup):
    _, train, test = setup
    two_tasks = random_dataset(6, 2)
    two_tasks.tasks = ["segmentation", "depth"]
    other = train_model(two_tasks, TrainConfig(epochs=1, width=8, depth=2, head_width=8), progress=False)
    with pytest.raises(JobInputError, match="^" + re.escape(
            "checkpoint does not match the dataset: model tasks ['segmentation', 'depth'], "
            "dataset 'tiny' tasks ['segmentation', 'depth', 'normal']") + "$"):
        run_unlearning_job(other, train, test, [("i0", "depth")])
    wrong_classes = random_dataset(6, 3, classes=5)
    other = train_model(wrong_classes, TrainConfig(epochs=1, width=8, depth=2, head_width=8), progress=False)
    with pytest.raises(JobInputError, match="^" + re.escape(
            "checkpoint does not match the dataset: head 'segmentation' has 5 output channels, dataset needs 3") + "$"):
        run_unlearning_job(other, train, test, [("i0", "depth")])


def test_a_checkpoint_for_other_image_channels_is_refused(setup):
    from unlearning.model import ModelConfig, MultiTaskNet

    _, train, test = setup
    cfg = ModelConfig.for_dataset(train, width=8, depth=2, head_width=8)
    cfg.in_channels = 1  # e.g. a model for gray images
    other = MultiTaskNet(cfg)
    with pytest.raises(JobInputError, match="takes 1-channel images, the training images of 'tiny' have 3"):
        run_unlearning_job(other, train, test, [("i0", "depth")])


def test_a_checkpoint_whose_parameters_are_of_another_dtype_than_the_images_is_refused(setup):
    """A float64 model on the float32 data failed inside its first convolution, mid-job."""
    import copy

    from unlearning.job import check_model_matches

    model, train, test = setup
    check_model_matches(model, train, test)
    wide = copy.deepcopy(model).double()
    with pytest.raises(JobInputError, match=r"checkpoint does not match the dataset: the model's parameters are "
                                            r"torch\.float64, the training images of 'tiny' are torch\.float32"):
        run_unlearning_job(wide, train, test, [("i0", "depth")], config={"steps": 1})


def test_unknown_method_is_refused(setup):
    model, train, test = setup
    with pytest.raises(KeyError, match="unknown unlearning method"):
        run_unlearning_job(model, train, test, [("i0", "depth")], method="magic")


def test_unknown_config_key_is_refused(setup):
    model, train, test = setup
    with pytest.raises(JobInputError, match="no parameter 'stpes'"):
        run_unlearning_job(model, train, test, [("i0", "depth")], config={"stpes": 5})


def test_same_cells_compares_instances_order_and_erased_cells(setup):
    _, train, _ = setup
    assert train.same_cells(train.without([]))
    assert not train.same_cells(train.without([("i0", "depth")]))
    assert train.without([("i0", "depth")]).same_cells(train.without([("i0", "depth")]))
    assert not train.same_cells(train.subset(list(reversed(range(len(train))))))
    assert not train.same_cells(train.subset(range(len(train) - 1)))


def test_data_stays_where_it_is_on_the_cpu(setup):
    from unlearning.job import on_device

    _, train, _ = setup
    cache: dict = {}
    assert on_device(cache, "train", train, torch.device("cpu")) is train
    assert cache == {}  # nothing copied, nothing held


def test_releasing_a_versions_device_data_keeps_the_rest_of_its_cache(setup):
    from unlearning.evaluate import EvalContext
    from unlearning.job import release_device_data

    model, train, test = setup
    # stand-ins for the copies on_device would have made on a GPU (other objects, same cells)
    placed_train, placed_test = train.without([]), test.without([])
    ctx = EvalContext(model, placed_train, placed_test)
    engine = {("heldout_losses", len(test)): {}}
    cache = {("resident", "train"): (train, placed_train), ("resident", "test"): (test, placed_test),
             "eval_context": ctx, "engine": engine}
    assert release_device_data(cache) == 2
    assert set(cache) == {"eval_context", "engine"} and cache["engine"] is engine
    assert ctx.train is train and ctx.test is test  # the context's numbers stay; its data is the host's
    assert release_device_data(cache) == 0
    # a CPU job keeps no copies, so there is nothing to release
    plain: dict = {}
    run_unlearning_job(model, train, test, [("i0", "depth")], config={"steps": 2}, cache=plain)
    assert release_device_data(plain) == 0 and plain["eval_context"].train is train


@pytest.mark.parametrize("method,config,says", [
    ("interference_aware", {"steps": "ten"}, "'steps' must be an integer, got 'ten'"),
    ("interference_aware", {"steps": 0}, "'steps' must be >= 1, got 0"),  # an erasure that erases nothing
    ("interference_aware", {"project": "no"}, "'project' must be true or false"),  # "no" is a true value
    ("interference_aware", {"lr": float("nan")}, "'lr' must be a finite number"),
    ("interference_aware", {"tau_quantile_partial": 5}, "'tau_quantile_partial' must be >= 0 and <= 1"),
    ("interference_aware", {"shadow_recipe": {"epochz": 1}}, "'shadow_recipe' has no field 'epochz'"),
    ("finetune", {"steps": 2.5}, "'steps' must be an integer, got 2.5"),
    ("finetune", {"batch_size": 0, "lr": -1}, "'batch_size' must be >= 1, got 0; finetune parameter 'lr' must be > 0"),
    ("retrain", {"train": {"epochz": 1}}, "'train' has no field 'epochz'"),
    ("retrain", {"epochs": 0}, "retrain parameter 'epochs' must be >= 1"),
    ("retrain", {"train": "garbage"}, "'train' must be a mapping"),
    ("finetune", ["steps"], "must be a mapping of parameter names to values, got list"),
    # strings with a fixed set of values, Adam's betas, the calibration's folds, fixed levels
    ("finetune", {"optimizer": "Adam"}, "'optimizer' must be one of 'adam', 'sgd', got 'Adam'"),
    ("interference_aware", {"calibrate_per": "instance"}, "'calibrate_per' must be one of 'request', 'cell'"),
    ("interference_aware", {"orthogonalize_impl": "gpu"}, "'orthogonalize_impl' must be one of"),
    ("interference_aware", {"shadow_extrapolate": "linear"}, "'shadow_extrapolate' must be one of"),
    ("interference_aware", {"betas": [0.9, 1.0]}, "'betas' must be >= 0 and < 1, got 1.0 (each)"),
    ("interference_aware", {"shadow_trained_folds": 0}, "'shadow_trained_folds' must be >= 1, got 0"),
    ("interference_aware", {"shadow_trained_folds": 5}, "'shadow_trained_folds' (5) must be at most 'shadow_folds' (4)"),
    ("interference_aware", {"orthogonalize": "iterate", "orthogonalize_impl": "batched"}, "has only the 'per_tensor'"),
    ("interference_aware", {"tau": {"depth": -1.0}}, "'tau' must give each task a positive finite level"),
    ("interference_aware", {"tau": {"normal": 0.5}}, "must give every forgotten task a positive level; missing: ['depth']"),
    # a misspelt task was no level of any task, and passed
    ("interference_aware", {"tau": {"depht": 0.5, "depth": 0.5}}, "'tau' names ['depht'], no task of the dataset; its "
                                                                  "tasks: ['segmentation', 'depth', 'normal']"),
    # stored calibration scores: a table of {instance: {task: score in [0, 1]}} per mode (a string
    # was an AttributeError inside the method, 5 an expected MIA AUC of 5.0)
    ("interference_aware", {"shadow_scores": "x"}, "'shadow_scores' must be a mapping with 'full' and 'partial' tables"),
    ("interference_aware", {"shadow_scores": {"partial": {"i0": {"depth": 5}}}},
     "'shadow_scores' ['partial']['i0']['depth'] must be a score in [0, 1], got 5"),
    ("interference_aware", {"shadow_scores": {"full": {"i0": {"depth": 0.5}, "i1": {"normal": float("inf")}}}},
     "'shadow_scores' ['full']['i1']['normal'] must be a score in [0, 1], got inf"),
    ("interference_aware", {"shadow_scores": {"full": {"i0": {"depth": "0.5", "normal": True}}}},
     "'shadow_scores' ['full']['i0']['depth'] must be a score in [0, 1], got '0.5' (and 1 more)"),
    ("interference_aware", {"shadow_scores": {"full": [0.5]}}, "'shadow_scores' ['full'] must be a mapping"),
    ("interference_aware", {"shadow_scores": {"partial": {"i0": 0.5}}}, "'shadow_scores' ['partial']['i0'] must be an "
                                                                        "instance id (a string) mapped to {task: score}"),
    # seeds torch refuses once the code's offset is added ("Overflow when unpacking long long" mid-job)
    ("interference_aware", {"shadow_seed": 2**64}, f"'shadow_seed' must be >= {-(2**63) - 7_919} and "
                                                   f"<= {2**64 - 1 - 7_919}, got {2**64}"),
    ("interference_aware", {"shadow_recipe": {"seed": 2**64}}, f"'shadow_recipe'['seed'] must be >= {-(2**63)} and "
                                                               f"<= {2**64 - 1}, got {2**64}"),
    ("retrain", {"train": {"seed": -(2**63) - 1}}, f"'train'['seed'] must be >= {-(2**63)}"),
])
def test_a_configuration_value_the_method_cannot_use_is_refused_before_any_work(setup, method, config, says):
    model, train, test = setup
    cache: dict = {}
    with pytest.raises(JobInputError) as err:
        run_unlearning_job(model, train, test, [("i0", "depth")], method=method, config=config, cache=cache)
    assert says in str(err.value)
    assert not cache.get("engine") and set(cache) <= {"engine"}  # nothing was computed


def test_documented_configurations_are_accepted(setup):
    from unlearning.methods.params import config_problems

    assert config_problems("retrain", {"epochs": 1, "train": {"epochs": 2, "grad_clip": None}}) == []  # retrain's docstring
    assert config_problems("interference_aware", {"orthogonalize": "iterate", "tau_quantile_partial": None,
                                                  "tau_refresh_sample": None, "betas": [0.9, 0.99]}) == []
    # what the project's own tools write or read: a recipe trained with a negative seed
    # (unlearnd train --seed -1), no clipping, no recipe
    assert config_problems("retrain", {"train": {"seed": -1}}) == []
    assert config_problems("interference_aware", {"shadow_recipe": {"seed": -1}, "shadow_seed": -2}) == []
    assert config_problems("finetune", {"grad_clip": None, "train": None}) == []
    assert config_problems("interference_aware", {"optimizer": "sgd", "calibrate_per": "request",
                                                  "shadow_extrapolate": "task_mean", "shadow_trained_folds": 2,
                                                  "orthogonalize_impl": "batched", "tau": {"depth": 0.3}}) == []
    model, train, test = setup
    result = run_unlearning_job(model, train, test, [("i0", "depth")], method="retrain", config={"epochs": 1})
    assert result.log["config"]["train"]["epochs"] == 1


def test_a_job_whose_weights_diverge_raises_instead_of_returning_them(setup):
    from unlearning.job import UnlearningDiverged

    model, train, test = setup
    with pytest.raises(UnlearningDiverged, match="non-finite weights"):
        run_unlearning_job(model, train, test, [("i0", "depth")], method="finetune", config={"steps": 3, "lr": 1e30})


def test_the_finiteness_check_names_the_tensors(setup):
    import copy

    from unlearning.job import UnlearningDiverged, check_finite

    model, _, _ = setup
    check_finite(model, "x")
    broken = copy.deepcopy(model)
    name, tensor = next(iter(broken.state_dict().items()))
    tensor.view(-1)[0] = float("inf")
    with pytest.raises(UnlearningDiverged, match=f"1 of .* tensors \\({name}\\)"):
        check_finite(broken, "x")


def test_a_job_whose_update_overflows_raises_instead_of_skipping_the_rest(setup):
    # a NaN gradient used to be skipped as a step of norm 0, and stayed in Adam's moments:
    # every later step was skipped too, and the job "succeeded" with UIS NaN
    from unlearning.job import UnlearningDiverged

    model, train, test = setup
    with pytest.raises(UnlearningDiverged, match="interference_aware: the update is not finite"):
        run_unlearning_job(model, train, test, [("i1", "depth")],  # below its level (i0's is at it: no step)
                           config={"optimizer": "sgd", "lr": 1e6, "max_norm": 1e9, "steps": 30})


def test_a_model_with_finite_weights_and_non_finite_predictions_is_refused(setup):
    import copy

    from unlearning.job import UnlearningDiverged, check_finite, check_predictions_finite

    model, train, test = setup
    check_predictions_finite(model, test.images, "x")
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.heads["depth"].out.weight.fill_(3e38)  # finite, but its outputs overflow
    check_finite(broken, "x")
    broken.train()
    with pytest.raises(UnlearningDiverged, match=r"x left a model whose depth predictions are not finite on 8 probe"):
        check_predictions_finite(broken, test.images, "x")
    assert broken.training  # run in eval mode, then put back as it was


def test_adam_counts_steps_per_parameter_like_torch(setup):
    # a parameter that joins late (repair_protected_heads) gets Adam's first steps, not
    # steps bias-corrected with the other parameters' count (up to 4x too large)
    from unlearning.methods.interference_aware import DEFAULTS, Stepper

    early, late, twin = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    stepper = Stepper(dict(DEFAULTS, lr=0.1))
    reference = torch.optim.Adam([twin], lr=0.1, betas=DEFAULTS["betas"], eps=1e-8)
    gradient = torch.tensor([1.0, -2.0, 0.5])
    for _ in range(50):
        _, g = stepper.precondition([early], [None], [gradient])
        stepper.step([early], g)
    for _ in range(5):
        _, g = stepper.precondition([early, late], [None, None], [gradient, gradient])
        stepper.step([early, late], g)
        twin.grad = gradient.clone()
        reference.step()
    torch.testing.assert_close(late.detach(), twin.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,says", [({"device": "tpu"}, "device 'tpu'"), ({"seed": "abc"}, "seed must be an integer"),
                                          ({"device": "meta"}, "device 'meta' is not supported: use 'auto', 'cpu' or"),
                                          ({"device": torch.device("meta")}, "is not supported"),
                                          ({"device": "cuda:64"}, "device 'cuda:64' requested but"),
                                          ({"seed": 1.0}, "seed must be an integer"),
                                          ({"seed": True}, "seed must be an integer"),
                                          ({"seed": 2**70}, "seed 1180591620717411303424 is out of range")])
def test_a_bad_device_or_seed_is_a_job_input_error(setup, kwargs, says):
    model, train, test = setup
    with pytest.raises(JobInputError, match=says):
        run_unlearning_job(model, train, test, [("i0", "depth")], config={"steps": 1}, **kwargs)


def test_an_empty_test_set_or_erasing_every_cell_is_a_job_input_error(setup):
    model, train, test = setup
    for method in ("interference_aware", "finetune"):  # one answer, whichever method
        with pytest.raises(JobInputError, match="the test set is empty"):
            run_unlearning_job(model, train, test.subset([]), [("i0", "depth")], method=method, config={"steps": 1})
        with pytest.raises(JobInputError, match="leaves no training data"):
            run_unlearning_job(model, train, test, train.cells(), method=method, config={"steps": 1})


def test_a_test_set_that_holds_training_instances_is_a_job_input_error(setup):
    """The audit's attack takes its non-members from the test set: with members among them its
    AUC was measured against itself, and the job ran (mia_auc 0.21) without a word."""
    model, train, test = setup
    for held_out in (train, train.subset([0, 1, 2])):
        with pytest.raises(JobInputError, match=r"the test set holds training instances \(i0, i1, i\d+"):
            run_unlearning_job(model, train, held_out, [("i0", "depth")], method="finetune", config={"steps": 1})


def test_a_test_instance_is_named_as_held_out(setup):
    """It was "unknown instance": the job holds the test set and can say what it is."""
    model, train, test = setup
    held_out = test.instance_ids[0]
    assert held_out not in train.instance_ids
    with pytest.raises(JobInputError, match=rf"^instance '{held_out}' is in the test set: held-out data the model "
                                            r"was not trained on, so there is nothing of it to erase$"):
        run_unlearning_job(model, train, test, [(held_out, "depth")], method="finetune", config={"steps": 1})
    with pytest.raises(JobInputError, match="unknown instance 'nope'"):
        run_unlearning_job(model, train, test, [("nope", "depth")], method="finetune", config={"steps": 1})


def test_forget_cells_as_a_numpy_array_and_a_method_name_as_a_list(setup):
    """An array of cells raised numpy's "truth value of an array is ambiguous" (now each row is
    named as no pair); get_method(["x"]), "unhashable type: 'list'"."""
    np = pytest.importorskip("numpy")
    model, train, test = setup
    from unlearning.methods import get_method

    with pytest.raises(JobInputError, match=r"a forget cell is an \(instance_id, task\) pair, got array\("):
        run_unlearning_job(model, train, test, np.array([["i0", "depth"]]), method="finetune", config={"steps": 1})
    with pytest.raises(KeyError, match=r"unknown unlearning method \['x'\]; known methods"):
        get_method(["x"])


def test_a_numpy_integer_seed_is_a_seed(setup):
    """``for seed in np.arange(3)`` gives numpy integers: the same runs as Python's (they were refused as
    "seed must be an integer, got np.int64(1)")."""
    np = pytest.importorskip("numpy")
    model, train, test = setup
    cells = [("i0", "depth")]
    plain = run_unlearning_job(model, train, test, cells, method="finetune", config={"steps": 2}, seed=1)
    numpy_seed = run_unlearning_job(model, train, test, cells, method="finetune", config={"steps": 2}, seed=np.int64(1))
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                 numpy_seed.model.state_dict().values()))


def test_a_model_on_the_jobs_device_is_used_as_it_is_and_one_elsewhere_is_copied(setup, monkeypatch):
    """The job moves a copy, never the caller's model (Module.to is in place; tests/gpu runs
    it on CUDA); "cuda" is the current CUDA device, so the worker's model (loaded on it) is
    not copied for nothing."""
    from unlearning import job

    d = torch.device
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert job._same_device(d("cuda"), d("cuda:1")) and job._same_device(d("cuda:1"), d("cuda"))
    assert not job._same_device(d("cuda"), d("cuda:0")) and not job._same_device(d("cuda:0"), d("cuda:1"))
    assert job._same_device(d("cpu"), d("cpu")) and not job._same_device(d("cpu"), d("cuda"))
    monkeypatch.undo()

    model, train, test = setup
    moved = []
    real_to = type(model).to

    def to(self, *args, **kwargs):
        moved.append(self)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "to", to)
    monkeypatch.setattr(job, "_same_device", lambda a, b: False)  # as if the model were on another device
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_unlearning_job(model, train, test, [("i0", "depth")], method="finetune", config={"steps": 2})
    assert moved and all(m is not model for m in moved)  # a copy went to the device, the caller's did not
    assert result.model is not model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_test_set_with_another_number_of_classes_is_a_job_input_error(setup):
    """Same tasks, another label set: the job said nothing until torch's cross-entropy failed."""
    model, train, test = setup
    other = random_dataset(8, 1, prefix="t", classes=5)
    with pytest.raises(JobInputError, match=r"the test set does not match the training set: 'segmentation' .*\(5 classes\)"):
        run_unlearning_job(model, train, other, [("i0", "depth")], config={"steps": 1})


def test_the_cells_order_is_the_callers_and_a_set_is_taken_sorted(setup):
    """The cells' order is part of a job's input (as its seed): a list keeps it; a set, whose order
    depends on the process's hash seed, is sorted, so it gives one model whatever the process."""
    from unlearning.job import validate_forget_cells

    model, train, test = setup
    cells = [("i3", "depth"), ("i1", "normal"), ("i1", "depth")]
    assert validate_forget_cells(train, cells) == cells
    assert validate_forget_cells(train, set(cells)) == sorted(cells)
    assert validate_forget_cells(train, frozenset(cells)) == sorted(cells)
    from_set = run_unlearning_job(model, train, test, set(cells), config={"steps": 2})
    from_sorted = run_unlearning_job(model, train, test, sorted(cells), config={"steps": 2})
    assert from_set.metrics["forget_cells"] == [list(c) for c in sorted(cells)]
    assert all(torch.equal(a, b) for a, b in zip(from_set.model.state_dict().values(),
                                                 from_sorted.model.state_dict().values()))


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_reference_of_its_own_is_what_the_method_reads_while_the_audit_keeps_the_test_set(setup):
    """``reference`` replaces the held-out data interference_aware reads (its levels τ), not the
    evaluation's: the audit's membership attack still takes the test set's instances."""
    model, train, test = setup
    other = random_dataset(8, 2, prefix="r")
    cells, cfg = [("i0", "depth"), ("i1", "segmentation")], {"steps": 5}
    default = run_unlearning_job(model, train, test, cells, config=cfg, cache={})
    as_test = run_unlearning_job(model, train, test, cells, config=cfg, cache={}, reference=test)
    own = run_unlearning_job(model, train, test, cells, config=cfg, cache={}, reference=other)
    assert default.metrics["reference"] == {"source": "test_split", "instances": 8}
    assert as_test.metrics["reference"] == {"source": "test_split", "instances": 8}  # the test set is no reference of its own
    assert own.metrics["reference"] == {"source": "own", "instances": 8}
    # the test set given as the reference is the default's run, step for step
    assert _same_weights(default.model, as_test.model)
    # other held-out data, other levels, other steps; the attack's non-members are the same
    assert not _same_weights(default.model, own.model)
    assert own.metrics["mia_auc_original"] == default.metrics["mia_auc_original"]
    # a method that reads no held-out data takes the same steps with or without one
    plain = run_unlearning_job(model, train, test, cells, method="finetune", config={"steps": 3}, cache={})
    given = run_unlearning_job(model, train, test, cells, method="finetune", config={"steps": 3}, cache={},
                               reference=other)
    assert _same_weights(plain.model, given.model) and given.metrics["reference"]["source"] == "own"


def test_a_bad_reference_is_a_job_input_error_naming_it(setup):
    model, train, test = setup
    cells = [("i0", "depth")]
    cases = [
        (test.subset([]), "the held-out reference is empty"),
        (random_dataset(8, 2, prefix="r", classes=5), r"the reference set does not match the training set: "
                                                      r"'segmentation' .*\(5 classes\)"),
        (random_dataset(8, 2, prefix="r", size=(4, 4)), r"reference images \(4, 4\)"),
        (train.subset([3, 0, 5, 7, 9]), r"holds training instances \(i0, i3, i5 and 2 more\)"),
        (test.subset([0, 1]), r"shares instances with the test set \(t0, t1\), where the audit's attack"),
    ]
    for reference, says in cases:
        with pytest.raises(JobInputError, match=says):
            run_unlearning_job(model, train, test, cells, config={"steps": 1}, reference=reference)


def test_interference_aware_leaves_the_model_as_it_was_when_every_cell_is_at_its_level_already(setup):
    """Every forget cell's loss already in its band [τ, τ(1 + band)] at the start: nothing to
    forget, so no step runs (the settling steps used to move every weight, UIS > 0 for nothing
    erased). Just above the band, the cell is something to do."""
    from unlearning.evaluate import forget_cell_losses

    model, train, test = setup
    cells = [("i0", "depth")]
    loss = float(forget_cell_losses(model, train, cells)["depth"][0])
    at_level = run_unlearning_job(model, train, test, cells, config={"steps": 5, "tau": {"depth": loss / 1.05}})
    assert at_level.log["nothing_to_forget"] is True and at_level.log["all_cells_reached_tau"] is True
    assert at_level.log["steps"] == 0 and at_level.metrics["uis"] == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in at_level.model.state_dict().items())
    below = run_unlearning_job(model, train, test, cells, config={"steps": 5, "tau": {"depth": loss * 1.5}})
    assert below.log["nothing_to_forget"] is False and below.log["steps"] > 0
