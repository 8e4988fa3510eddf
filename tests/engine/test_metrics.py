"""UIS, MIA AUC and forget gap on constructed numbers whose values are known by hand."""
import math

import pytest
import torch

from unlearning.metrics import forget_gap, group_degradations, member_scores, mia_auc, relative_degradation, uis

SEG = {"miou": +1, "pixel_acc": +1}
DEPTH = {"abs_err": -1, "rel_err": -1, "delta1": +1}


# --- relative degradation -------------------------------------------------------------


def test_no_change_is_exactly_zero():
    m = {"miou": 0.37, "pixel_acc": 0.81}
    assert relative_degradation(m, dict(m), SEG) == 0.0


def test_known_degradation_miou_half_to_point_four_is_twenty_percent_of_that_metric():
    # mIoU 0.5 -> 0.4 is a 20% drop; pixel acc unchanged: d_g = (20 + 0) / 2 = 10
    before = {"miou": 0.5, "pixel_acc": 0.8}
    after = {"miou": 0.4, "pixel_acc": 0.8}
    assert relative_degradation(before, after, SEG) == pytest.approx(10.0)
    assert relative_degradation({"miou": 0.5}, {"miou": 0.4}, {"miou": +1}) == pytest.approx(20.0)


def test_lower_is_better_metrics_use_their_direction():
    # abs err 0.2 -> 0.3 is +50% worse, rel err 0.1 -> 0.1 unchanged, delta1 0.8 -> 0.6 is 25% worse
    before = {"abs_err": 0.2, "rel_err": 0.1, "delta1": 0.8}
    after = {"abs_err": 0.3, "rel_err": 0.1, "delta1": 0.6}
    assert relative_degradation(before, after, DEPTH) == pytest.approx((50 + 0 + 25) / 3)


def test_improvements_are_clipped_to_zero():
    before = {"abs_err": 0.2, "rel_err": 0.1, "delta1": 0.8}
    better = {"abs_err": 0.1, "rel_err": 0.05, "delta1": 0.9}
    assert relative_degradation(before, better, DEPTH) == 0.0
    # an improvement in one metric does not offset a degradation in another
    mixed = {"abs_err": 0.1, "rel_err": 0.1, "delta1": 0.4}  # delta1 -50%
    assert relative_degradation(before, mixed, DEPTH) == pytest.approx(50 / 3)


def test_zero_original_metric_counts_zero_but_stays_in_the_mean():
    before = {"miou": 0.0, "pixel_acc": 0.5}
    after = {"miou": 0.0, "pixel_acc": 0.25}  # pixel acc -50%
    assert relative_degradation(before, after, SEG) == pytest.approx(25.0)


def test_a_perfect_lower_is_better_metric_lost_is_infinite():
    # abs err 0 -> 5 counted 0 (as mIoU 0 does), while 1e-9 -> 5 counted 1.7e11 percent
    before = {"abs_err": 0.0, "rel_err": 0.0, "delta1": 1.0}
    assert relative_degradation(before, {"abs_err": 5.0, "rel_err": 1.0, "delta1": 0.5}, DEPTH) == float("inf")
    assert relative_degradation(before, dict(before), DEPTH) == 0.0  # still perfect: nothing lost
    # a NaN elsewhere is NaN whichever metric comes first
    assert math.isnan(relative_degradation(before, {"abs_err": 0.01, "rel_err": math.nan, "delta1": 1.0}, DEPTH))


def test_an_infinite_original_value_gives_nan_not_zero():
    # max(0, -(inf - 1) / inf) is max(0, nan), which Python answers 0: a diverged original read as "no change"
    assert math.isnan(relative_degradation({"abs_err": math.inf}, {"abs_err": 1.0}, {"abs_err": -1}))
    assert math.isnan(relative_degradation({"miou": math.inf}, {"miou": 0.5}, {"miou": +1}))


def test_nan_after_is_not_hidden_as_zero():
    assert math.isnan(relative_degradation({"miou": 0.5}, {"miou": float("nan")}, {"miou": +1}))


# --- UIS -----------------------------------------------------------------------------


def test_uis_reads_the_normal_tasks_directions_from_the_registry():
    # mean angle 20 -> 30 is 50% worse (lower is better), a11 .5 -> .25 is 50% worse,
    # median, a22 and a30 unchanged: d_g = (50 + 0 + 50 + 0 + 0) / 5 = 20
    before = {"mean_angle": 20.0, "median_angle": 10.0, "a11": 0.5, "a22": 0.8, "a30": 0.9}
    after = {**before, "mean_angle": 30.0, "a11": 0.25}
    key = ("inst", "normal", "test")
    out = uis({key: before}, {key: after})
    assert out == {"uis": pytest.approx(20.0), "uis_task": 0.0, "uis_inst": pytest.approx(20.0)}
    # the other way round both metrics improve: clipped to 0
    assert uis({key: after}, {key: before}) == {"uis": 0.0, "uis_task": 0.0, "uis_inst": 0.0}


def test_uis_groups_task_level_vs_instance_level_and_overall_mean():
    before = {
        ("task", "segmentation", "forgotten"): {"miou": 0.5, "pixel_acc": 0.8},
        ("inst", "segmentation", "retained"): {"miou": 0.5, "pixel_acc": 0.8},
        ("inst", "segmentation", "test"): {"miou": 0.5, "pixel_acc": 0.8},
        ("inst", "depth", "test"): {"abs_err": 0.2, "rel_err": 0.1, "delta1": 0.8},
    }
    after = {
        ("task", "segmentation", "forgotten"): {"miou": 0.4, "pixel_acc": 0.8},  # d = 10
        ("inst", "segmentation", "retained"): {"miou": 0.5, "pixel_acc": 0.8},  # d = 0
        ("inst", "segmentation", "test"): {"miou": 0.6, "pixel_acc": 0.4},  # miou better (0), acc -50%: d = 25
        ("inst", "depth", "test"): {"abs_err": 0.3, "rel_err": 0.1, "delta1": 0.6},  # d = 25
    }
    out = uis(before, after)
    assert out["uis_task"] == pytest.approx(10.0)
    assert out["uis_inst"] == pytest.approx((0 + 25 + 25) / 3)
    # every group weighs the same: not the mean of uis_task and uis_inst
    assert out["uis"] == pytest.approx((10 + 0 + 25 + 25) / 4)
    assert set(out) == {"uis", "uis_task", "uis_inst"}
    d = group_degradations(before, after)
    assert d[("inst", "depth", "test")] == pytest.approx(25.0)


def test_uis_without_task_level_groups_full_task_mode():
    before = {("inst", "segmentation", "test"): {"miou": 0.5, "pixel_acc": 0.5}}
    after = {("inst", "segmentation", "test"): {"miou": 0.25, "pixel_acc": 0.5}}
    out = uis(before, after)
    assert out == {"uis": pytest.approx(25.0), "uis_task": 0.0, "uis_inst": pytest.approx(25.0)}


def test_uis_no_change_is_zero_and_explicit_directions_are_used():
    groups = {("inst", "x", "test"): {"score": 3.0}, ("task", "x", "forgotten"): {"score": 1.0}}
    assert uis(groups, groups, {"x": {"score": +1}}) == {"uis": 0.0, "uis_task": 0.0, "uis_inst": 0.0}
    worse = {("inst", "x", "test"): {"score": 6.0}, ("task", "x", "forgotten"): {"score": 1.0}}
    assert uis(groups, worse, {"x": {"score": -1}})["uis"] == pytest.approx(50.0)  # 100% on one of two groups


def test_uis_rejects_mismatched_groups_and_bad_levels():
    with pytest.raises(ValueError):
        uis({("inst", "depth", "test"): {}}, {})
    g = {("other", "x", "test"): {"s": 1.0}}
    with pytest.raises(ValueError):
        uis(g, g, {"x": {"s": 1}})


# --- MIA AUC -------------------------------------------------------------------------


def test_mia_all_members_lower_is_one_and_all_higher_is_zero():
    assert mia_auc([0.1, 0.2, 0.3], [0.5, 0.6, 0.7, 0.8]) == 1.0
    assert mia_auc([0.9, 1.0], [0.5, 0.6]) == 0.0


def test_mia_identical_distributions_is_one_half():
    x = torch.linspace(0, 1, 11)
    assert mia_auc(x, x) == pytest.approx(0.5)


def test_mia_ties_count_one_half():
    assert mia_auc([0.5], [0.5, 0.5]) == 0.5
    # member 0.5 vs [0.4, 0.5, 0.6]: one above (1), one tie (0.5), one below (0) -> 1.5 / 3
    assert mia_auc([0.5], [0.4, 0.5, 0.6]) == pytest.approx(0.5)
    # member 0.5 vs [0.5, 0.6, 0.7, 0.8]: 3 above + 0.5 tie -> 3.5 / 4
    assert mia_auc([0.5], [0.5, 0.6, 0.7, 0.8]) == pytest.approx(0.875)


def test_mia_single_member_is_its_rank_among_heldout():
    heldout = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    # 0.35 is above 3 held-out losses and below 7: AUC = 7 / 10
    assert mia_auc([0.35], heldout) == pytest.approx(0.7)
    # order of the held-out losses does not matter
    assert mia_auc(torch.tensor([0.35]), torch.tensor(heldout[::-1])) == pytest.approx(0.7)


def test_mia_two_members_known_value():
    # member 0.15: above 1 of 4 -> 3/4; member 0.45: above all 4 -> 0 ; mean 3/8
    assert mia_auc([0.15, 0.45], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.375)


def test_mia_per_task_compares_only_within_a_task_and_weights_by_cells():
    # depth losses live on a different scale than segmentation; pooling would give another answer
    members = {"segmentation": [1.0, 3.0], "depth": [0.05]}
    nonmembers = {"segmentation": [2.0, 4.0], "depth": [0.1, 0.2]}
    # seg: 1.0 -> 2/2, 3.0 -> 1/2; depth: 0.05 -> 2/2; mean over 3 cells = (1 + .5 + 1) / 3
    assert mia_auc(members, nonmembers) == pytest.approx(2.5 / 3)
    pooled = mia_auc([1.0, 3.0, 0.05], [2.0, 4.0, 0.1, 0.2])
    assert pooled != pytest.approx(2.5 / 3)
    # = per-task AUC weighted by number of member cells
    seg, dep = mia_auc([1.0, 3.0], [2.0, 4.0]), mia_auc([0.05], [0.1, 0.2])
    assert mia_auc(members, nonmembers) == pytest.approx((2 * seg + 1 * dep) / 3)


def test_mia_drops_nan_and_is_nan_with_nothing_to_compare():
    assert mia_auc([0.1, float("nan")], [0.2, float("nan")]) == 1.0
    assert math.isnan(mia_auc([], [0.1]))
    assert math.isnan(mia_auc({"depth": [0.1]}, {"normal": [0.2]}))


def test_member_scores_average_to_the_auc_with_infinite_losses():
    inf = float("inf")
    # member inf vs [1, inf]: below none, tied with one -> 0.5 / 2; member -inf vs [-inf, 1]: 1 + 0.5 tie -> 0.75
    assert member_scores([inf], [1.0, inf]).tolist() == [0.25] == [mia_auc([inf], [1.0, inf])]
    assert member_scores([-inf], [-inf, 1.0]).tolist() == [0.75] == [mia_auc([-inf], [-inf, 1.0])]
    members, nonmembers = [0.5, inf, float("nan"), 0.1], [0.2, inf, 0.7]
    scores = member_scores(members, nonmembers)
    assert math.isnan(scores[2])
    assert float(scores[~scores.isnan()].mean()) == pytest.approx(mia_auc(members, nonmembers))


# --- forget gap ----------------------------------------------------------------------


def test_forget_gap_known_values():
    # depth: Lu = 0.3, Lr = 0.2 -> 0.5 ; normal: Lu = 0.1, Lr = 0.2 -> 0.5 ; seg: equal -> 0
    unlearned = {"depth": [0.2, 0.4], "normal": [0.1], "segmentation": [1.0, 2.0]}
    retrained = {"depth": [0.1, 0.3], "normal": [0.2], "segmentation": [2.0, 1.0]}
    assert forget_gap(unlearned, retrained) == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert forget_gap([0.2, 0.4], [0.1, 0.3]) == pytest.approx(0.5)
    assert forget_gap({"depth": [0.0]}, {"depth": [0.0]}) == 0.0
    assert forget_gap({"depth": [0.1]}, {"depth": [0.0]}) == float("inf")
