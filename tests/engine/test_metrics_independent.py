"""design §3 written again, in NumPy, from the definitions alone (per-task metrics,
the groups, d_g, UIS, the loss-threshold attack's AUC, the forget gap), and compared
with :func:`unlearning.evaluate.evaluate_unlearning` on a small trained model whose
copy is perturbed. The other tests check each piece on hand-computed values; this one
checks that the pieces are put together as the design says: which cells each group
holds (a request mixing a partial and a full erasure, cells erased before), which
model is measured where, and how the means are taken."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from unlearning.data import load_splits
from unlearning.evaluate import evaluate_unlearning, retained_sample
from unlearning.train import TrainConfig, train_model

# metric -> s_m (+1: higher is better), design §1
DIRECTIONS = {"segmentation": {"miou": 1, "pixel_acc": 1}, "depth": {"abs_err": -1, "rel_err": -1, "delta1": 1},
              "normal": {"mean_angle": -1, "median_angle": -1, "a11": 1, "a22": 1, "a30": 1}}


def _predict(model, data, rows, task) -> np.ndarray:
    with torch.no_grad():
        return model(data.images[rows], data.tasks)[task].double().numpy()


def _labelled(task, target) -> bool:
    if task == "segmentation":
        return bool((target != -1).any())
    if task == "depth":
        return bool((target[0] > 0).any())
    return bool((target.abs().sum(0) > 0).any())


def _metrics(model, data, rows, task) -> dict[str, float] | None:
    """The task's metrics over the set's labelled pixels, pooled (None: nothing labelled)."""
    rows = [r for r in rows if _labelled(task, data.targets[task][r])]
    if not rows:
        return None
    p, t = _predict(model, data, rows, task), data.targets[task][rows].double().numpy()
    if task == "segmentation":
        label, valid = p.argmax(1), t != -1
        present = [c for c in range(p.shape[1]) if ((t == c) & valid).any()]
        ious = [((label == c) & (t == c) & valid).sum() / (((label == c) | (t == c)) & valid).sum() for c in present]
        return {"miou": float(np.mean(ious)), "pixel_acc": float(((label == t) & valid).sum() / valid.sum())}
    if task == "depth":
        valid = t[:, 0] > 0
        pred, gt = p[:, 0][valid], t[:, 0][valid]
        return {"abs_err": float(np.abs(pred - gt).mean()), "rel_err": float((np.abs(pred - gt) / gt).mean()),
                "delta1": float((np.maximum(pred / gt, gt / pred) < 1.25).mean())}
    valid = np.abs(t).sum(1) > 0
    unit = p / np.linalg.norm(p, axis=1, keepdims=True)
    angle = np.degrees(np.arccos(np.clip((unit * t).sum(1)[valid], -1, 1)))
    return {"mean_angle": float(angle.mean()), "median_angle": float(np.median(angle)),
            "a11": float((angle < 11.25).mean()), "a22": float((angle < 22.5).mean()),
            "a30": float((angle < 30).mean())}


def _d_g(task, before, after) -> float:
    return 100 * float(np.mean([max(0.0, s * (before[m] - after[m]) / abs(before[m]))
                                for m, s in DIRECTIONS[task].items()]))


def _losses(model, data, rows, task) -> np.ndarray:
    """Per sample: mean over its labelled pixels of CE / L1 / 1 − cos (NaN: none labelled)."""
    p, t = _predict(model, data, rows, task), data.targets[task][rows].double().numpy()
    if task == "segmentation":
        valid = t != -1
        logp = p - np.log(np.exp(p - p.max(1, keepdims=True)).sum(1, keepdims=True)) - p.max(1, keepdims=True)
        per_pixel = -np.take_along_axis(logp, np.clip(t, 0, None)[:, None].astype(int), 1)[:, 0]
    elif task == "depth":
        valid, per_pixel = t[:, 0] > 0, np.abs(p[:, 0] - t[:, 0])
    else:
        valid, per_pixel = np.abs(t).sum(1) > 0, 1 - (p * t).sum(1)
    return np.array([per_pixel[i][valid[i]].mean() if valid[i].any() else np.nan for i in range(len(rows))])


def _auc(members, nonmembers) -> list[float]:
    """Per member: P(non-member loss > its loss) + ½ P(tie), by counting pairs."""
    nonmembers = [x for x in nonmembers if not np.isnan(x)]
    return [sum(1.0 if n > m else 0.5 if n == m else 0.0 for n in nonmembers) / len(nonmembers)
            for m in members if not np.isnan(m)]


@pytest.fixture(scope="module")
def setting():
    torch.set_num_threads(1)
    train, test = load_splits({"name": "indoor", "n_train": 20, "n_test": 10, "height": 24, "width": 32, "seed": 0})
    ids = train.instance_ids
    train = train.without([(ids[3], "depth"), (ids[5], "normal")])  # erased before: cells no group may hold
    original = train_model(train, TrainConfig(epochs=5, width=8, depth=3, head_width=8, lr=4e-3),
                           progress=False).eval()
    unlearned = copy.deepcopy(original)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unlearned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    # instance 3 forgets segmentation (its depth is gone already), 7 depth, 9 every task
    cells = [(ids[3], "segmentation"), (ids[7], "depth"), (ids[9], "segmentation"), (ids[9], "depth"),
             (ids[9], "normal")]
    return train, test, original, unlearned, cells


def test_evaluation_is_design_section_3(setting):
    train, test, original, unlearned, cells = setting
    report = evaluate_unlearning(original, unlearned, train, cells, test, retrained=original, seed=0)
    ids, tasks = train.instance_ids, list(train.tasks)
    row = {iid: k for k, iid in enumerate(ids)}
    forgotten, instances = set(cells), list(dict.fromkeys(i for i, _ in cells))

    groups = {}  # (level, task, set) -> (data, rows)
    for task in tasks:
        k = tasks.index(task)
        # G_task: the forgotten instances' cells of other tasks that stay supervised
        kept = [row[i] for i in instances if train.available[row[i], k] and (i, task) not in forgotten]
        if kept:
            groups[("task", task, "forgotten")] = (train, kept)
        sample = retained_sample(train, instances, 64, 0)
        assert not set(sample) & set(instances)
        groups[("inst", task, "retained")] = (train, [row[i] for i in sample if train.available[row[i], k]])
        groups[("inst", task, "test")] = (test, list(range(len(test))))
    d = {}
    for (level, task, name), (data, rows) in groups.items():
        before, after = _metrics(original, data, rows, task), _metrics(unlearned, data, rows, task)
        if before is not None:
            d[(level, task, name)] = _d_g(task, before, after)
    code = {(g["level"], g["task"], g["set"]): g["degradation"] for g in report["groups"]}
    assert set(code) == set(d)
    for key in d:
        assert code[key] == pytest.approx(d[key], rel=1e-4, abs=1e-6), key
    # G_task: segmentation (7's), normal (3's and 7's); no depth (3's erased before, 7 and 9 forget it)
    assert {k[1] for k in d if k[0] == "task"} == {"segmentation", "normal"}
    assert sum(v > 0 for v in d.values()) >= 4
    task_level = [v for k, v in d.items() if k[0] == "task"]
    instance_level = [v for k, v in d.items() if k[0] == "inst"]
    assert report["uis"] == pytest.approx(np.mean(task_level + instance_level), rel=1e-5)
    assert report["uis_task"] == pytest.approx(np.mean(task_level), rel=1e-5)
    assert report["uis_inst"] == pytest.approx(np.mean(instance_level), rel=1e-5)
    assert report["mode"] == "partial"

    def attack(model):
        scores = []
        for task in tasks:
            members = [row[i] for i, t in cells if t == task]
            if members:
                scores += _auc(_losses(model, train, members, task), _losses(model, test, list(range(len(test))), task))
        return float(np.mean(scores))

    assert report["mia_auc"] == pytest.approx(attack(unlearned), abs=1e-9)
    assert report["mia_auc_original"] == report["mia_auc_retrain"] == pytest.approx(attack(original), abs=1e-9)
    gaps = []
    for task in tasks:
        members = [row[i] for i, t in cells if t == task]
        mean_u = np.nanmean(_losses(unlearned, train, members, task))
        mean_r = np.nanmean(_losses(original, train, members, task))
        gaps.append(abs(mean_u - mean_r) / mean_r)
    assert report["forget_gap"] == pytest.approx(np.mean(gaps), rel=1e-5)
