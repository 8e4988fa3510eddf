"""Every task's metrics and loss against values computed by hand on tiny tensors."""
import math

import pytest
import torch

from unlearning.tasks import IGNORE, TASKS, get_task


def seg_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits (1,C,H,W) whose argmax is ``labels`` (H,W)."""
    return torch.nn.functional.one_hot(labels, num_classes).permute(2, 0, 1).float().unsqueeze(0) * 5.0


# --- segmentation --------------------------------------------------------------------

SEG_TARGET = torch.tensor([[[0, 0, 1], [1, IGNORE, 0]]])
SEG_PRED = torch.tensor([[0, 1, 1], [2, 0, 0]])


def test_segmentation_miou_and_pixel_accuracy_by_hand():
    # 5 valid pixels (one ignored); correct: (0,0), (0,2), (1,2) -> pixel acc 3/5.
    # Confusion (rows GT, cols pred): gt0 -> [2,1,0], gt1 -> [0,1,1], gt2 -> [0,0,0].
    # IoU0 = 2 / (3 + 2 - 2) = 2/3, IoU1 = 1 / (2 + 2 - 1) = 1/3; class 2 is absent from the
    # ground truth (only predicted) so it is left out of the mean: mIoU = 1/2 (it would be 1/3
    # if it counted as IoU 0). Its false positive still lowers IoU1 through gt1's row.
    m = get_task("segmentation").compute_metrics(seg_logits(SEG_PRED, 3), SEG_TARGET)
    assert m["pixel_acc"] == pytest.approx(0.6)
    assert m["miou"] == pytest.approx(0.5)


def test_segmentation_metrics_accumulate_over_batches_like_one_set():
    task = get_task("segmentation")
    state = task.metric_state()
    # the same pixels, split into two "images" of one row each
    task.update_metrics(state, seg_logits(SEG_PRED[:1], 3), SEG_TARGET[:, :1])
    task.update_metrics(state, seg_logits(SEG_PRED[1:], 3), SEG_TARGET[:, 1:])
    m = task.finalize_metrics(state)
    assert m["pixel_acc"] == pytest.approx(0.6)
    assert m["miou"] == pytest.approx(0.5)


def test_segmentation_loss_ignores_the_ignore_pixel():
    task = get_task("segmentation")
    logits = torch.zeros(1, 3, 2, 3)
    logits[0, 1, 1, 1] = 20.0  # the ignored pixel: a huge loss if it were counted
    loss = task.sample_loss(logits, SEG_TARGET)
    assert loss.shape == (1,)
    assert float(loss[0]) == pytest.approx(math.log(3.0), rel=1e-5)  # uniform logits on valid pixels


@pytest.mark.parametrize("name", ["segmentation", "depth", "normal"])
def test_a_set_with_nothing_measured_has_no_value_not_a_perfect_or_useless_score(name):
    # 0 was returned: a perfect error (abs_err 0, 0°), which any later model "lost" infinitely
    task = get_task(name)
    empty = task.finalize_metrics(task.metric_state())
    assert set(empty) == set(task.metrics) and all(math.isnan(v) for v in empty.values())
    unlabelled = {"segmentation": torch.full((1, 2, 2), -1), "depth": torch.zeros(1, 1, 2, 2),
                  "normal": torch.zeros(1, 3, 2, 2)}[name]
    pred = torch.ones(1, 3 if name != "depth" else 1, 2, 2)
    state = task.metric_state()
    task.update_metrics(state, pred, unlabelled)
    assert all(math.isnan(v) for v in task.finalize_metrics(state).values())


# --- depth ---------------------------------------------------------------------------

DEPTH_TARGET = torch.tensor([[[[1.0, 2.0, 0.0], [4.0, 0.5, 1.0]]]])  # 0 = invalid
DEPTH_PRED = torch.tensor([[[[1.1, 3.0, 5.0], [4.0, 0.6, 0.7]]]])


def test_depth_abs_rel_delta_by_hand():
    # valid pairs (t, p): (1,1.1) (2,3) (4,4) (0.5,0.6) (1,0.7)
    # abs: .1 1 0 .1 .3 -> 1.5/5 ; rel: .1 .5 0 .2 .3 -> 1.1/5
    # max ratio: 1.1 1.5 1 1.2 1.43 -> three below 1.25 -> 3/5
    m = get_task("depth").compute_metrics(DEPTH_PRED, DEPTH_TARGET)
    assert m["abs_err"] == pytest.approx(0.3)
    assert m["rel_err"] == pytest.approx(0.22)
    assert m["delta1"] == pytest.approx(0.6)


def test_depth_metrics_accumulate_over_batches_like_one_set():
    # row 0 holds 2 valid pairs, row 1 holds 3: a mean of per-batch means would give
    # abs (0.55 + 0.4/3) / 2, rel (0.3 + 0.5/3) / 2, delta1 (1/2 + 2/3) / 2 instead
    task = get_task("depth")
    state = task.metric_state()
    task.update_metrics(state, DEPTH_PRED[:, :, :1], DEPTH_TARGET[:, :, :1])
    task.update_metrics(state, DEPTH_PRED[:, :, 1:], DEPTH_TARGET[:, :, 1:])
    m = task.finalize_metrics(state)
    assert m["abs_err"] == pytest.approx(0.3)
    assert m["rel_err"] == pytest.approx(0.22)
    assert m["delta1"] == pytest.approx(0.6)


def test_depth_loss_is_l1_over_valid_pixels():
    loss = get_task("depth").sample_loss(DEPTH_PRED, DEPTH_TARGET)
    assert float(loss[0]) == pytest.approx(0.3)  # the invalid pixel's error of 5 is left out


# --- normals -------------------------------------------------------------------------


def tilted(deg: float, scale: float = 1.0) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([math.sin(a), 0.0, math.cos(a)]) * scale


def normal_case():
    target = torch.zeros(1, 3, 1, 5)
    pred = torch.zeros(1, 3, 1, 5)
    for j, (deg, scale) in enumerate([(0, 1.0), (10, 1.0), (20, 1.0), (45, 3.0)]):
        target[0, :, 0, j] = torch.tensor([0.0, 0.0, 1.0])
        pred[0, :, 0, j] = tilted(deg, scale)  # the 45 degree one is not unit length on purpose
    pred[0, :, 0, 4] = torch.tensor([1.0, 0.0, 0.0])  # 90 degrees, but its target is invalid (zero)
    return pred, target


def test_normal_angles_by_hand():
    pred, target = normal_case()
    m = get_task("normal").compute_metrics(pred, target)
    # valid angles 0, 10, 20, 45
    assert m["mean_angle"] == pytest.approx(18.75, abs=1e-4)
    assert m["median_angle"] == pytest.approx(15.0, abs=1e-4)  # true median of an even count
    assert m["a11"] == pytest.approx(0.5)
    assert m["a22"] == pytest.approx(0.75)
    assert m["a30"] == pytest.approx(0.75)


def test_normal_metrics_accumulate_over_batches_like_one_set():
    # batch 1: the 0 degree pixel; batch 2: 10, 20, 45 and the invalid one. Per-batch
    # values averaged would give mean 12.5, median 10, a11 2/3, a22 and a30 5/6.
    pred, target = normal_case()
    task = get_task("normal")
    state = task.metric_state()
    task.update_metrics(state, pred[..., :1], target[..., :1])
    task.update_metrics(state, pred[..., 1:], target[..., 1:])
    m = task.finalize_metrics(state)
    assert m["mean_angle"] == pytest.approx(18.75, abs=1e-4)
    assert m["median_angle"] == pytest.approx(15.0, abs=1e-4)
    assert m["a11"] == pytest.approx(0.5)
    assert m["a22"] == pytest.approx(0.75)
    assert m["a30"] == pytest.approx(0.75)


def test_normal_loss_is_one_minus_cosine_over_valid_pixels():
    pred, target = normal_case()
    task = get_task("normal")
    loss = task.sample_loss(task.activate(pred), target)
    expected = sum(1 - math.cos(math.radians(d)) for d in (0, 10, 20, 45)) / 4
    assert float(loss[0]) == pytest.approx(expected, abs=1e-6)


# --- a blown-up prediction on an unlabelled pixel -----------------------------------


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_prediction_on_an_unlabelled_pixel_does_not_reach_the_loss(bad):
    # masking by a product gave 0 * inf = NaN for the whole sample: a fake NaN member in the attack
    seg = get_task("segmentation")
    logits = torch.zeros(1, 3, 2, 3)
    logits[0, 1, 1, 1] = bad  # the ignored pixel of SEG_TARGET
    assert float(seg.sample_loss(logits, SEG_TARGET)[0]) == pytest.approx(math.log(3.0), rel=1e-5)
    # nor the metrics, which read labelled pixels only (they were NaN: a diverged head in UIS)
    clean = seg.compute_metrics(torch.zeros(1, 3, 2, 3), SEG_TARGET)
    assert seg.compute_metrics(logits, SEG_TARGET) == clean and math.isfinite(clean["miou"])
    logits[0, 2, 0, 0] = bad  # on a labelled pixel it shows
    assert all(math.isnan(v) for v in seg.compute_metrics(logits, SEG_TARGET).values())

    depth = DEPTH_PRED.clone()
    depth[0, 0, 0, 2] = bad  # its target is 0: invalid
    assert float(get_task("depth").sample_loss(depth, DEPTH_TARGET)[0]) == pytest.approx(0.3)

    normal = get_task("normal")
    pred, target = normal_case()
    pred = normal.activate(pred)
    pred[0, :, 0, 4] = bad  # its target is the zero vector: invalid
    expected = sum(1 - math.cos(math.radians(d)) for d in (0, 10, 20, 45)) / 4
    assert float(normal.sample_loss(pred, target)[0]) == pytest.approx(expected, abs=1e-6)
    # on a labelled pixel it still shows
    pred[0, :, 0, 0] = bad
    assert not math.isfinite(float(normal.sample_loss(pred, target)[0]))


# --- the registry --------------------------------------------------------------------


DIRECTIONS = {
    "segmentation": {"miou": +1, "pixel_acc": +1},
    "depth": {"abs_err": -1, "rel_err": -1, "delta1": +1},
    "normal": {"mean_angle": -1, "median_angle": -1, "a11": +1, "a22": +1, "a30": +1},
}


def test_every_task_has_a_direction_case():
    assert set(TASKS) == set(DIRECTIONS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_finalized_metrics_match_the_declared_directions(name):
    task = get_task(name)
    # errors and angles: lower is better; accuracies, IoU and threshold shares: higher
    assert task.metrics == DIRECTIONS[name]
    if name == "segmentation":
        pred, target = seg_logits(SEG_PRED, 3), SEG_TARGET
    elif name == "depth":
        pred, target = DEPTH_PRED, DEPTH_TARGET
    else:
        pred, target = normal_case()
    assert set(task.compute_metrics(pred, target)) == set(task.metrics)


# --- a non-finite target -------------------------------------------------------------


def test_an_infinite_target_is_an_unlabelled_pixel_as_nan_is():
    # NaN, 0 and negative depth were invalid but +inf was "valid": a dataset built in Python
    # with inf for "no return" (sky, out of range) got an infinite loss and abs_err, and an
    # inf in a normal a NaN loss; the npy loader already reads both as invalid pixels
    depth = get_task("depth")
    target = DEPTH_TARGET.clone()
    target[0, 0, 0, 2] = float("inf")  # was 0: the same pixel, now inf
    assert not bool(depth.valid(target)[0, 0, 2])
    assert float(depth.sample_loss(DEPTH_PRED, target)[0]) == pytest.approx(0.3)
    assert depth.compute_metrics(DEPTH_PRED, target) == depth.compute_metrics(DEPTH_PRED, DEPTH_TARGET)
    assert not bool(depth.labelled(torch.full((1, 1, 2, 2), float("inf")))[0])

    normal = get_task("normal")
    pred, target = normal_case()
    pred = normal.activate(pred)
    clean_loss, clean = normal.sample_loss(pred, target), normal.compute_metrics(pred, target)
    target[0, :, 0, 4] = torch.tensor([float("inf"), 0.0, 0.0])  # was the zero vector: invalid
    assert not bool(normal.valid(target)[0, 0, 4])
    assert float(normal.sample_loss(pred, target)[0]) == pytest.approx(float(clean_loss[0]), abs=1e-6)
    assert normal.compute_metrics(pred, target) == clean


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", ["depth", "normal"])
def test_a_non_finite_target_pixel_reaches_neither_the_loss_nor_its_gradient(name, bad):
    # a NaN normal target was masked out of the loss but not out of its gradient
    # (d(pred . target)/d(pred) = target: NaN * 0 = NaN), so one such pixel made training diverge
    task = get_task(name)
    channels = 1 if name == "depth" else 3
    raw = torch.randn(1, channels, 2, 2, requires_grad=True)
    target = torch.nn.functional.normalize(torch.ones(1, channels, 2, 2), dim=1)
    target[0, 0, 0, 0] = bad
    loss = task.sample_loss(task.activate(raw), target)
    loss.sum().backward()
    assert not bool(task.valid(target)[0, 0, 0]) and int(task.valid(target).sum()) == 3
    assert math.isfinite(float(loss.detach()[0])) and bool(torch.isfinite(raw.grad).all())
    assert float(raw.grad[0, :, 0, 0].abs().sum()) == 0.0  # the unlabelled pixel trains nothing


def test_segmentation_metrics_name_a_label_the_prediction_has_no_class_for():
    # a 6-class head scored on 13-class labels (another dataset's checkpoint, through
    # task_metrics) failed inside the confusion matrix: "shape '[6, 6]' is invalid for input of size 77"
    seg = get_task("segmentation")
    with pytest.raises(ValueError, match=r"labels span \[0, 12\] but the prediction has 6 classes"):
        seg.compute_metrics(torch.zeros(1, 6, 2, 2), torch.tensor([[[0, 12], [1, IGNORE]]]))
    with pytest.raises(ValueError, match=r"labels span \[-2, 1\]"):
        seg.compute_metrics(torch.zeros(1, 6, 2, 2), torch.tensor([[[0, -2], [1, IGNORE]]]))
