"""Synthetic datasets, the .npy loaders and cell erasure."""
import re

import numpy as np
import pytest
import torch

from unlearning.data import load_splits
from unlearning.data.npy_format import load_npy_splits
from unlearning.data.synthetic import load_synthetic

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = {"n_train": 6, "n_test": 3, "height": 24, "width": 32}


@pytest.fixture(scope="module")
def indoor():
    return load_synthetic({"name": "indoor", **SMALL})


# --------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name, tasks, classes", [("indoor", ["segmentation", "depth", "normal"], 6),
                                                   ("street", ["segmentation", "depth"], 7)])
def test_synthetic_tensors_follow_the_task_contracts(name, tasks, classes):
    train, test = load_splits({"name": name, **SMALL})
    assert train.tasks == tasks and test.tasks == tasks
    assert train.num_classes == classes == test.num_classes
    assert len(train) == 6 and len(test) == 3
    assert train.images.shape == (6, 3, 24, 32) and train.images.dtype == torch.float32
    assert 0 <= train.images.min() and train.images.max() <= 1
    seg = train.targets["segmentation"]
    assert seg.shape == (6, 24, 32) and seg.dtype == torch.long
    assert seg.min() >= -1 and seg.max() < classes and (seg == -1).any()
    depth = train.targets["depth"]
    assert depth.shape == (6, 1, 24, 32) and depth.dtype == torch.float32
    assert depth.min() == 0 and (depth > 0).float().mean() > 0.5
    if "normal" in tasks:
        normal = train.targets["normal"]
        length = normal.norm(dim=1)
        assert normal.shape == (6, 3, 24, 32)
        assert torch.allclose(length[length > 0], torch.ones(()), atol=1e-4)
    assert train.available.all()


def test_same_spec_gives_identical_tensors_and_other_seeds_differ(indoor):
    again = load_synthetic({"name": "indoor", **SMALL})
    for a, b in zip(indoor, again):
        assert torch.equal(a.images, b.images)
        for t in a.tasks:
            assert torch.equal(a.targets[t], b.targets[t])
        assert a.instance_ids == b.instance_ids
    other = load_synthetic({"name": "indoor", **SMALL, "seed": 1})[0]
    assert not torch.equal(other.images, indoor[0].images)


def test_instance_ids_are_stable_unique_and_splits_disjoint(indoor):
    train, test = indoor
    assert train.instance_ids == [f"indoor-{i:05d}" for i in range(6)]
    assert test.instance_ids == [f"indoor-test-{i:05d}" for i in range(3)]
    assert not set(train.instance_ids) & set(test.instance_ids)
    # Disjoint scenes, not only disjoint names.
    flat_train, flat_test = train.images.flatten(1), test.images.flatten(1)
    assert torch.cdist(flat_test, flat_train).min() > 1.0
    # Growing the split keeps the scenes already there.
    bigger = load_synthetic({"name": "indoor", **SMALL, "n_train": 8, "n_test": 1})[0]
    assert torch.equal(bigger.images[:6], train.images)
    assert bigger.instance_ids[:6] == train.instance_ids


def test_noise_options_in_the_spec():
    clean = load_synthetic({"name": "indoor", **SMALL, "n_test": 0, "noise": "clean"})[0]
    assert (clean.targets["segmentation"] >= 0).all() and (clean.targets["depth"] > 0).all()
    noisy = load_synthetic({"name": "indoor", **SMALL, "n_test": 0, "noise": {"label_ignore": 0.0}})[0]
    assert (noisy.targets["segmentation"] >= 0).all()  # only the ignore option was switched off
    assert (noisy.targets["depth"] == 0).any()
    with pytest.raises(ValueError, match="depth_noise"):
        load_synthetic({"name": "indoor", "noise": {"depth_noise": 0.1}})
    with pytest.raises(ValueError, match="n_trian"):
        load_synthetic({"name": "indoor", "n_trian": 3})
    with pytest.raises(KeyError, match="forest"):
        load_splits({"name": "forest"})


@pytest.mark.parametrize("key, value", [("n_train", 2.5), ("n_test", "3"), ("height", 16.7), ("seed", True),
                                        ("width", None)])
def test_synthetic_spec_numbers_are_integers_not_truncated(key, value):
    """A size or seed that is not an integer is refused naming it (it was int()-ed: 2.5 scenes
    rendered 2, seed True rendered seed 1's scenes), as unknown keys are."""
    with pytest.raises(ValueError, match=f"'{key}' in the 'indoor' dataset spec must be an integer, got {value!r}"):
        load_synthetic({"name": "indoor", **SMALL, "n_test": 0, key: value})


@pytest.mark.parametrize("height, width, n", [(1, 32, 0), (-3, 32, 0), (24, 0, 0), (1, 32, 1)])
def test_synthetic_sizes_below_2_are_refused_even_for_empty_splits(height, width, n):
    """Empty splits used to accept a size no scene can have (1 row) or fail in torch.zeros
    (a negative one), where the same spec with scenes was refused."""
    spec = {"name": "street", "n_train": n, "n_test": 0, "height": height, "width": width}
    with pytest.raises(ValueError, match=rf"height and width in the 'street' dataset spec must be at least 2, "
                                         rf"got {height}x{width}"):
        load_splits(spec)


@pytest.mark.parametrize("noise", [{"depth_sigma": float("inf")}, {"label_flip": True}, {"label_flip": "0.5"}])
def test_noise_values_that_are_not_finite_numbers_are_refused_as_spec_errors(noise):
    """A spec's bad noise value is the ValueError the CLIs turn into their one-line error,
    raised before anything is rendered."""
    (key, value), = noise.items()
    with pytest.raises(ValueError, match=f"noise option '{key}' must be .*, got {re.escape(repr(value))}"):
        load_splits({"name": "indoor", **SMALL, "noise": noise})


@pytest.mark.parametrize("spec", ["indoor", None, ["indoor"]])
def test_a_spec_that_is_not_a_dict_is_refused_as_a_spec_error(spec):
    """A bare name used to fail with an AttributeError ('str' object has no attribute 'get'),
    which the CLIs do not turn into their one-line error."""
    from unlearning.data import dataset_tasks

    for read in (load_splits, dataset_tasks):
        with pytest.raises(ValueError, match=rf"a dataset spec is a dict such as .*, got {re.escape(repr(spec))}"):
            read(spec)


# --------------------------------------------------------------------------- erasure


def test_partial_erasure_keeps_the_image_for_the_other_tasks(indoor):
    train = indoor[0]
    iid = train.instance_ids[2]
    erased = train.without([(iid, "depth")])
    assert len(erased) == len(train)
    assert not erased.has_cell((iid, "depth"))
    assert erased.has_cell((iid, "segmentation")) and erased.has_cell((iid, "normal"))
    i = erased.index_of(iid)
    assert torch.equal(erased.images[i], train.images[2])
    assert erased.batch([i]).has["depth"].tolist() == [False]
    assert (iid, "depth") not in erased.cells() and len(erased.cells()) == len(train.cells()) - 1
    assert train.has_cell((iid, "depth"))  # the original is untouched


def test_an_erasure_that_drops_no_instance_shares_the_tensors_and_one_that_drops_copies(indoor):
    """``without`` copied every image and target even where every instance stayed (each job
    applies the tombstones to the cached splits); the mask is its own either way."""
    train = indoor[0]
    iid = train.instance_ids[2]
    for cells in ([], [(iid, "depth")], [(iid, "depth"), ("no-such-instance", "depth")]):
        erased = train.without(cells)
        assert erased.images is train.images
        assert all(erased.targets[t] is train.targets[t] for t in train.tasks)
        assert erased.instance_ids == train.instance_ids and erased.erased_instances == train.erased_instances
        assert erased.available.data_ptr() != train.available.data_ptr()
        assert erased.has_cell((iid, "depth")) == (not cells) and train.has_cell((iid, "depth"))
    # again on the result: an erased cell stays erased, and the tensors are still the originals
    twice = train.without([(iid, "depth")]).without([(iid, "normal")])
    assert twice.images is train.images and twice.cells() == [c for c in train.cells()
                                                              if c not in [(iid, "depth"), (iid, "normal")]]
    dropped = twice.without([(iid, "segmentation")])  # its last cell: the instance goes, the rest is copied
    assert iid not in dropped.instance_ids and iid in dropped.erased_instances
    assert dropped.images.data_ptr() != train.images.data_ptr()
    assert torch.equal(dropped.images, torch.cat([train.images[:2], train.images[3:]]))


def test_a_dataset_moved_to_a_device_keeps_its_ids_cells_and_tensors(indoor):
    erased = indoor[0].without([(indoor[0].instance_ids[1], "normal")])
    assert erased.to("cpu") is erased  # already there
    moved = erased.to("meta")  # a device without data: what is moved, not where
    assert moved.images.device.type == "meta" and all(v.device.type == "meta" for v in moved.targets.values())
    assert moved.instance_ids == erased.instance_ids and moved.num_classes == erased.num_classes
    assert moved.available.device.type == "meta" and moved.available.shape == erased.available.shape
    assert erased.images.device.type == "cpu"  # the original stays
    assert erased.nbytes == sum(t.numel() * t.element_size() for t in (erased.images, *erased.targets.values()))


def test_full_erasure_drops_the_instance(indoor):
    train = indoor[0]
    iid = train.instance_ids[1]
    erased = train.without([(iid, t) for t in train.tasks])
    assert len(erased) == len(train) - 1 and iid not in erased.instance_ids
    with pytest.raises(KeyError, match=iid):
        erased.index_of(iid)
    kept = erased.index_of(train.instance_ids[2])
    assert torch.equal(erased.images[kept], train.images[2])
    # Erasing task by task ends the same way.
    stepwise = train
    for t in train.tasks:
        stepwise = stepwise.without([(iid, t)])
    assert stepwise.instance_ids == erased.instance_ids


def test_strict_erasure_names_the_bad_cell(indoor):
    train = indoor[0]
    iid = train.instance_ids[0]
    once = train.without([(iid, "normal")], strict=True)
    with pytest.raises(ValueError, match=f"{iid}.*normal.*already erased"):
        once.without([(iid, "normal")], strict=True)
    with pytest.raises(KeyError, match="indoor-99999"):
        train.without([("indoor-99999", "depth")], strict=True)
    with pytest.raises(ValueError, match="'albedo'"):
        train.without([(iid, "albedo")], strict=True)
    # Lenient mode (applying stored tombstones) ignores what is already gone.
    again = once.without([(iid, "normal"), ("indoor-99999", "depth")])
    assert again.instance_ids == once.instance_ids and torch.equal(again.available, once.available)


def test_cells_that_are_no_list_of_pairs_are_named(indoor):
    """A bare cell was iterated as two cells (``unknown task '0'``), a triple or a bare string
    failed to unpack, a list as an id was unhashable; select("id") looked up its characters."""
    train = indoor[0]
    iid = train.instance_ids[0]
    with pytest.raises(ValueError, match=rf"cells are a list of \(instance_id, task\) pairs, got \('{iid}', "
                                         rf"'depth'\): pass \[\('{iid}', 'depth'\)\]"):
        train.check_cells((iid, "depth"))
    with pytest.raises(ValueError, match=f"got '{iid}'$"):
        train.check_cells(iid)
    for cell in [(iid, "depth", "x"), ([iid], "depth"), iid, (iid, 3)]:
        with pytest.raises(ValueError, match=r"a cell is an \(instance_id, task\) pair of strings, got "):
            train.check_cells([cell])
    assert train.check_cells([[iid, "depth"]]) == [(iid, "depth")]  # lists read as pairs, returned as tuples
    with pytest.raises(ValueError, match=f"select takes a list of instance ids, got the string '{iid}'"):
        train.select(iid)
    gone = train.without([(iid, t) for t in train.tasks])
    with pytest.raises(KeyError, match=f"instance '{iid}' is erased: every cell of it was erased"):
        gone.select([iid])
    with pytest.raises(KeyError, match="unknown instance 'nope'"):
        gone.select(["nope"])


@pytest.mark.parametrize("bad", [-2, 6])
def test_segmentation_labels_outside_the_classes_are_refused(indoor, bad):
    from unlearning.data.base import MultiTaskDataset

    train = indoor[0]
    targets = {t: v.clone() for t, v in train.targets.items()}
    assert train.num_classes == 6
    targets["segmentation"][0, 0, 0] = bad
    with pytest.raises(ValueError, match=rf"labels span \[{min(bad, -1)}, {max(bad, 5)}\]; they must be -1 \(ignore\) "
                                         r"or a class in \[0, 5\]"):
        MultiTaskDataset("bad", train.tasks, train.images, targets, train.instance_ids, train.num_classes)


@pytest.mark.parametrize("task, change, given, expected", [
    ("depth", lambda t: t[:, 0], "(6, 24, 32)", r"\(6, 1, 24, 32\), \(N,1,H,W\)"),  # no channel dimension
    ("normal", lambda t: t.permute(0, 2, 3, 1), "(6, 24, 32, 3)", r"\(6, 3, 24, 32\), \(N,3,H,W\)"),  # channels-last
    ("segmentation", lambda t: t[:, None], "(6, 1, 24, 32)", r"\(6, 24, 32\), \(N,H,W\)"),
    ("depth", lambda t: t[:, :, :, :16], "(6, 1, 24, 16)", r"\(6, 1, 24, 32\), \(N,1,H,W\)"),  # another size
    ("normal", lambda t: t[:5], "(5, 3, 24, 32)", r"\(6, 3, 24, 32\), \(N,3,H,W\)"),  # fewer targets
])
def test_targets_not_shaped_for_their_task_and_the_images_are_refused(indoor, task, change, given, expected):
    """A dataset built by hand with a target of the wrong shape is refused naming the task,
    the shape given and the one expected (training used to fail later with a torch error)."""
    from unlearning.data.base import MultiTaskDataset

    train = indoor[0]
    targets = {**train.targets, task: change(train.targets[task])}
    with pytest.raises(ValueError, match=rf"dataset 'bad': '{task}' targets have shape {re.escape(given)}; "
                                         rf"expected {expected} for 6 images of 24x32"):
        MultiTaskDataset("bad", train.tasks, train.images, targets, train.instance_ids, train.num_classes)


@pytest.mark.parametrize("part, change, says", [
    # 0.5 passed the label range check (int() truncated it) and failed in the loss: "expected
    # target dtype to be Long or Byte, but got Float"
    ("segmentation", lambda t: t.float() + 0.5, "'segmentation' targets are torch.float32; expected torch.int64"),
    ("segmentation", lambda t: t.int(), "'segmentation' targets are torch.int32; expected torch.int64"),
    ("segmentation", lambda t: t.clamp_min(0).to(torch.uint8), "'segmentation' targets are torch.uint8; expected "
                                                                 "torch.int64 (class indices, -1 to ignore a pixel)"),
    ("depth", lambda t: t.double(), "'depth' targets are torch.float64; expected torch.float32"),
    ("normal", lambda t: t.half(), "'normal' targets are torch.float16; expected torch.float32"),
    ("images", lambda t: t.double(), "images are torch.float64; expected torch.float32"),  # failed in the first conv
    ("images", lambda t: (t * 255).to(torch.uint8), "images are torch.uint8; expected torch.float32"),
])
def test_images_and_targets_of_another_dtype_are_refused_naming_the_task_and_dtype(indoor, part, change, says):
    """A dataset built by hand with the wrong dtype is refused where it is built, naming the
    dataset, the task and both dtypes, not mid-job with a torch error."""
    from unlearning.data.base import MultiTaskDataset

    train = indoor[0]
    images = change(train.images) if part == "images" else train.images
    targets = {**train.targets, **({part: change(train.targets[part])} if part != "images" else {})}
    with pytest.raises(ValueError, match=rf"^dataset 'bad': {re.escape(says)}"):
        MultiTaskDataset("bad", train.tasks, images, targets, train.instance_ids, train.num_classes)
    # what the loaders give passes, with or without a mask of supervised cells
    assert train.images.dtype == torch.float32 and train.targets["segmentation"].dtype == torch.int64
    assert len(MultiTaskDataset("ok", train.tasks, train.images, train.targets, train.instance_ids,
                                train.num_classes, train.available)) == 6


def test_images_ids_and_mask_not_shaped_for_each_other_are_refused(indoor):
    from unlearning.data.base import MultiTaskDataset

    train = indoor[0]
    with pytest.raises(ValueError, match=r"images have shape \(3, 24, 32\); expected \(N,C,H,W\)"):
        MultiTaskDataset("bad", train.tasks, train.images[0], train.targets, train.instance_ids, train.num_classes)
    ids = train.instance_ids[:4] + train.instance_ids[1:3]
    with pytest.raises(ValueError, match=rf"dataset 'bad': instance ids must be unique; repeated: "
                                         rf"{re.escape(repr(train.instance_ids[1:3]))}"):
        MultiTaskDataset("bad", train.tasks, train.images, train.targets, ids, train.num_classes)
    with pytest.raises(ValueError, match="has 5 instance ids for 6 images"):
        MultiTaskDataset("bad", train.tasks, train.images, train.targets, train.instance_ids[:5], train.num_classes)
    with pytest.raises(ValueError, match=r"mask of supervised cells has shape \(6, 2\); expected \(6, 3\)"):
        MultiTaskDataset("bad", train.tasks, train.images, train.targets, train.instance_ids, train.num_classes,
                         train.available[:, :2])
    # the well-shaped dataset, its subsets and erasures pass
    assert len(MultiTaskDataset("ok", train.tasks, train.images, train.targets, train.instance_ids, 6)) == 6
    assert len(train.subset([0, 2]).without([(train.instance_ids[0], t) for t in train.tasks])) == 1


# --------------------------------------------------------------------------- .npy format

H, W = 6, 8


def write_split(root, split, numbers, *, normal=True, channel_last=True, uint8=False, seed=0):
    """Write ``numbers`` samples of one split in the preprocessed layout; returns what was written."""
    rng = np.random.default_rng(seed)
    written = {}
    for folder in ("image", "label", "depth") + (("normal",) if normal else ()):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    for n in numbers:
        image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8) if uint8 else rng.random((H, W, 3), np.float32)
        label = rng.integers(-1, 7, (H, W)).astype(np.float32)  # float with -1 = ignore, as in the format
        depth = rng.uniform(0.5, 9.0, (H, W)).astype(np.float32)
        depth[0, :2] = 0.0
        vec = rng.standard_normal((H, W, 3)).astype(np.float32)
        vec /= np.linalg.norm(vec, axis=-1, keepdims=True)
        vec[1, 1] = 0.0
        layout = (lambda a: a) if channel_last else (lambda a: np.moveaxis(a, -1, 0))
        np.save(root / split / "image" / f"{n}.npy", layout(image))
        np.save(root / split / "label" / f"{n}.npy", label)
        np.save(root / split / "depth" / f"{n}.npy", depth if channel_last else depth[None])
        if normal:
            np.save(root / split / "normal" / f"{n}.npy", layout(vec))
        written[n] = (image, label, depth, vec)
    return written


@pytest.mark.parametrize("channel_last, uint8", [(True, True), (False, False)])
def test_nyuv2_loader_reads_both_layouts(tmp_path, channel_last, uint8):
    written = write_split(tmp_path, "train", range(12), channel_last=channel_last, uint8=uint8)
    write_split(tmp_path, "val", range(3), channel_last=channel_last, uint8=uint8, seed=1)
    train, val = load_splits({"name": "nyuv2", "root": str(tmp_path)})
    assert train.tasks == ["segmentation", "depth", "normal"] and train.num_classes == 13
    # Numeric order: 0, 1, 2, ..., 10, 11 (not 0, 1, 10, 11, 2, ...).
    assert train.instance_ids == [f"nyuv2-train-{n}" for n in range(12)]
    assert val.instance_ids == ["nyuv2-val-0", "nyuv2-val-1", "nyuv2-val-2"]
    assert train.images.shape == (12, 3, H, W) and train.images.dtype == torch.float32
    image, label, depth, vec = written[10]
    i = train.index_of("nyuv2-train-10")
    expected_image = image.astype(np.float32) / 255 if uint8 else image
    assert np.allclose(train.images[i].permute(1, 2, 0).numpy(), expected_image, atol=1e-6)
    seg = train.targets["segmentation"][i]
    assert seg.dtype == torch.long and torch.equal(seg, torch.from_numpy(label.astype(np.int64)))
    assert (seg == -1).any()
    assert train.targets["depth"].shape == (12, 1, H, W)
    assert torch.equal(train.targets["depth"][i, 0], torch.from_numpy(depth))
    normal = train.targets["normal"][i].permute(1, 2, 0).numpy()
    assert np.allclose(normal, vec, atol=1e-5) and (normal[1, 1] == 0).all()


def test_cityscapes_has_no_normals_and_limit_keeps_the_first_files(tmp_path):
    write_split(tmp_path, "train", range(5), normal=False)
    write_split(tmp_path, "val", range(4), normal=False)
    train, val = load_npy_splits({"name": "cityscapes", "root": tmp_path, "limit": 3})
    assert train.tasks == ["segmentation", "depth"] and train.num_classes == 7
    assert train.instance_ids == ["cityscapes-train-0", "cityscapes-train-1", "cityscapes-train-2"]
    assert len(val) == 3
    wide = load_npy_splits({"name": "cityscapes", "root": tmp_path, "num_classes": 19})[0]
    assert wide.num_classes == 19 and len(wide) == 5


def test_loader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path / "nowhere"})
    write_split(tmp_path, "train", range(3))
    with pytest.raises(FileNotFoundError, match="val"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    write_split(tmp_path, "val", range(2), normal=False)
    with pytest.raises(FileNotFoundError, match="val.normal"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    write_split(tmp_path, "val", range(2))
    assert len(load_npy_splits({"name": "nyuv2", "root": tmp_path})[1]) == 2

    (tmp_path / "train" / "depth" / "2.npy").unlink()
    with pytest.raises(ValueError, match=r"train.depth has 2 files for 3 images.*missing \[2\]"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    np.save(tmp_path / "train" / "depth" / "2.npy", np.ones((H, W + 1), np.float32))
    with pytest.raises(ValueError, match=r"depth.2\.npy has shape \(6, 9\)"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    np.save(tmp_path / "train" / "depth" / "2.npy", np.ones((H, W), np.float32))
    np.save(tmp_path / "train" / "label" / "1.npy", np.full((H, W), 13.0, np.float32))
    with pytest.raises(ValueError, match=r"label.1\.npy has label 13 but the dataset has 13 classes"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    np.save(tmp_path / "train" / "label" / "1.npy", np.zeros((H, W), np.float32))
    np.save(tmp_path / "train" / "normal" / "0.npy", np.full((H, W, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"normal.0\.npy does not hold unit normals"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    np.save(tmp_path / "train" / "normal" / "0.npy", np.full((H, W, 3), 3 ** -0.5, np.float32))
    np.save(tmp_path / "train" / "image" / "2.npy", np.full((H, W, 3), 200.0, np.float32))  # 0-255 stored as float
    with pytest.raises(ValueError, match=r"image.2\.npy: a float image must hold values in \[0, 1\].*\[200, 200\]"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    np.save(tmp_path / "train" / "image" / "2.npy", np.full((H, W, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"image.2\.npy: a float image"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    np.save(tmp_path / "train" / "image" / "2.npy", np.full((H, W, 3), 200, np.int64))
    with pytest.raises(ValueError, match=r"image.2\.npy: images must be uint8 \(0-255\) or float in \[0, 1\].*int64"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    np.save(tmp_path / "train" / "image" / "2.npy", np.full((H, W, 3), 0.5, np.float32))
    # A pickled object array is refused, never unpickled.
    np.save(tmp_path / "train" / "normal" / "0.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"cannot read .*normal.0\.npy"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    with pytest.raises(ValueError, match="lmit"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path, "lmit": 2})
    with pytest.raises(ValueError, match="root"):
        load_npy_splits({"name": "cityscapes"})


def unit_normals(h, w, seed=0):
    vec = np.random.default_rng(seed).standard_normal((h, w, 3)).astype(np.float32)
    return vec / np.linalg.norm(vec, axis=-1, keepdims=True)


def test_normals_are_checked_per_pixel_not_by_their_median_length(tmp_path):
    """A minority of vectors of another scale (2 rows in 6 of length 5 here) passed the median
    check and were silently renormalised; more than 1% of the non-zero vectors off unit
    length is refused, naming the file and the share."""
    write_pair(tmp_path)
    path = tmp_path / "train" / "normal" / "1.npy"
    vec = unit_normals(H, W)
    vec[:2] *= 5
    np.save(path, vec)
    with pytest.raises(ValueError, match=r"normal.1\.npy does not hold unit normals: 16 of its 48 non-zero vectors "
                                         r"\(33\.3%; at most 1% may be\) have a length off 1 by more than 0\.5 "
                                         r"\(median length 1\.000\)"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    vec = unit_normals(H, W)
    vec[0, 0] *= 1.6  # one in 48: over 1%
    np.save(path, vec)
    with pytest.raises(ValueError, match=r"1 of its 48 non-zero vectors \(2\.1%"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    # zero and NaN vectors are missing normals, not short ones: half the map may be missing
    vec = unit_normals(H, W)
    vec[:2] = 0.0
    vec[2, :] = np.nan
    vec[3, :3] *= 0.71  # resizing: two unit vectors at 90 degrees averaged, renormalised
    np.save(path, vec)
    normal = load_npy_splits({"name": "nyuv2", "root": tmp_path})[0].targets["normal"][1].permute(1, 2, 0).numpy()
    assert (normal[:3] == 0).all()
    assert np.allclose(np.linalg.norm(normal[3:], axis=-1), 1.0, atol=1e-6)
    assert np.allclose(normal[3:], unit_normals(H, W)[3:], atol=1e-6)


def test_a_few_normals_off_unit_length_are_renormalised(tmp_path):
    """Up to 1% of the non-zero vectors may be off unit length by more than 0.5, any number by
    less (the edges of a bilinearly resized map)."""
    from unlearning.data.npy_format import _normal

    path = tmp_path / "normal.npy"
    vec = unit_normals(20, 20)
    vec.reshape(-1, 3)[:4] *= 0.4  # 4 of 400: 1%
    vec.reshape(-1, 3)[4:40] *= 0.7  # 9%, within 0.5 of unit length: an edge of a resized map
    np.save(path, vec)
    normal = _normal(path, (20, 20))
    assert np.allclose(np.linalg.norm(normal, axis=0), 1.0, atol=1e-6)
    vec.reshape(-1, 3)[40] *= 0.4  # 5 of 400
    np.save(path, vec)
    with pytest.raises(ValueError, match=r"5 of its 400 non-zero vectors"):
        _normal(path, (20, 20))


def write_pair(tmp_path, *, normal=True):
    """A valid train (3 samples) and val (2 samples) folder."""
    write_split(tmp_path, "train", range(3), normal=normal)
    write_split(tmp_path, "val", range(2), normal=normal, seed=1)


@pytest.mark.parametrize("folder", ["image", "label"])
def test_ambiguous_numbering_is_refused_naming_both_files(tmp_path, folder):
    write_pair(tmp_path)
    other = tmp_path / "train" / folder / "002.npy"
    other.write_bytes((tmp_path / "train" / folder / "2.npy").read_bytes())
    # Whichever file won used to depend on directory order.
    with pytest.raises(ValueError, match=rf"{re.escape(str(other))} and .*{folder}.2\.npy both number sample 2"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})


def refused(tmp_path, relative: str, array: np.ndarray, message: str) -> None:
    """A valid pair of splits with ``relative`` replaced by ``array``: loading fails with
    ``message`` (a regex) right after the file's escaped path."""
    write_pair(tmp_path)
    path = tmp_path / relative
    np.save(path, array)
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})


@pytest.mark.parametrize("folder, array, dtype", [
    ("label", np.full((H, W), "a"), "<U1"),
    ("label", np.full((H, W), 1 + 1j), "complex128"),
    ("depth", np.full((H, W), "x"), "<U1"),
    ("depth", np.full((H, W), 2 + 0j, np.complex64), "complex64"),
    ("depth", np.ones((H, W), bool), "bool"),
    ("normal", np.full((H, W, 3), "x"), "<U1"),
    # numpy counts timedelta64 among the integers: a label failed with a TypeError naming no file,
    # a depth map was read as plain numbers
    ("label", np.full((H, W), 3, "m8[s]"), "timedelta64"),
    ("depth", np.full((H, W), 3, "m8[s]"), "timedelta64"),
    ("normal", np.full((H, W, 3), 1, "m8[s]"), "timedelta64"),
])
def test_non_numeric_targets_are_refused_naming_file_and_dtype(tmp_path, folder, array, dtype):
    refused(tmp_path, f"train/{folder}/1.npy", array, rf": .* integer or float array, this one is {dtype}")


def test_bool_labels_are_refused_as_ambiguous(tmp_path):
    refused(tmp_path, "train/label/1.npy", np.ones((H, W), bool), ": a bool label map is ambiguous")


@pytest.mark.parametrize("value, shown", [(1e19, r"1e\+19"), (1e30, r"1e\+30"), (np.inf, "inf"), (13.0, "13")])
def test_huge_float_labels_are_refused_before_the_int_cast(tmp_path, value, shown):
    label = np.zeros((H, W))
    label[2, 3] = value  # used to wrap to -2**63 and fail later, naming no file
    refused(tmp_path, "train/label/1.npy", label, f" has label {shown} but the dataset has 13 classes")


@pytest.mark.parametrize("array, shown", [
    (np.full((H, W), np.iinfo(np.int64).max), str(np.iinfo(np.int64).max)),
    (np.full((H, W), np.iinfo(np.uint64).max), str(np.iinfo(np.uint64).max)),
    (np.full((H, W), 255, np.uint8), "255"),
])
def test_out_of_range_integer_labels_are_named_exactly(tmp_path, array, shown):
    refused(tmp_path, "train/label/0.npy", array, f" has label {shown} but the dataset has 13 classes")


def test_fractional_labels_are_refused_and_nan_or_negative_still_mean_ignore(tmp_path):
    write_pair(tmp_path)
    path = tmp_path / "train" / "label" / "1.npy"
    label = np.zeros((H, W), np.float32)
    label[0, :4] = [np.nan, -np.inf, -3.5, 12.0]
    np.save(path, label)
    train = load_npy_splits({"name": "nyuv2", "root": tmp_path})[0]
    assert train.targets["segmentation"][1, 0, :5].tolist() == [-1, -1, -1, 12, 0]
    label[3, 3] = 2.5  # used to be rounded silently
    np.save(path, label)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} has label 2\.5, not a whole number"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})


def test_empty_images_are_refused_naming_the_file(tmp_path):
    write_pair(tmp_path)
    for split in ("train", "val"):
        for n in range(3 if split == "train" else 2):
            np.save(tmp_path / split / "image" / f"{n}.npy", np.zeros((0, W, 3), np.uint8))
            np.save(tmp_path / split / "label" / f"{n}.npy", np.zeros((0, W), np.float32))
            np.save(tmp_path / split / "depth" / f"{n}.npy", np.zeros((0, W), np.float32))
            np.save(tmp_path / split / "normal" / f"{n}.npy", np.zeros((0, W, 3), np.float32))
    path = tmp_path / "train" / "image" / "0.npy"
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is empty \(shape \(0, {W}, 3\)\)"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})


@pytest.mark.parametrize("key, value", [
    ("num_classes", 0), ("num_classes", -5), ("num_classes", 2.7), ("num_classes", "abc"), ("num_classes", True),
    ("limit", 0), ("limit", 1.9), ("limit", True), ("limit", "x"),
])
def test_spec_numbers_are_validated_naming_the_key(tmp_path, key, value):
    write_pair(tmp_path)
    with pytest.raises(ValueError, match=rf"'{key}' in the 'nyuv2' dataset spec must be a positive integer, "
                                         rf"got {re.escape(repr(value))}"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path, key: value})


def test_spec_root_must_be_a_path_and_valid_spec_numbers_still_load(tmp_path):
    with pytest.raises(ValueError, match=r"'root' in the 'nyuv2' dataset spec must be a folder path, got 5"):
        load_npy_splits({"name": "nyuv2", "root": 5})
    write_pair(tmp_path)
    train, val = load_npy_splits({"name": "nyuv2", "root": str(tmp_path), "num_classes": np.int64(20),
                                  "limit": 2})
    assert train.num_classes == 20 and len(train) == 2 and len(val) == 2
    assert load_npy_splits({"name": "nyuv2", "root": tmp_path, "num_classes": None, "limit": None})[0].num_classes == 13


def test_train_and_val_of_different_sizes_are_refused_at_load(tmp_path):
    write_split(tmp_path, "train", range(2))
    for n in range(2):
        for folder, shape in (("image", (4, W, 3)), ("label", (4, W)), ("depth", (4, W)), ("normal", (4, W, 3))):
            (tmp_path / "val" / folder).mkdir(parents=True, exist_ok=True)
            array = np.full(shape, {"normal": 3 ** -0.5, "label": 1.0}.get(folder, 0.5), np.float32)
            np.save(tmp_path / "val" / folder / f"{n}.npy", array)
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'train'))} images are \({H}, {W}\) but "
                                         rf"{re.escape(str(tmp_path / 'val'))} images are \(4, {W}\)"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})


def test_an_odd_first_label_is_named_not_its_image(tmp_path):
    write_pair(tmp_path)
    path = tmp_path / "train" / "label" / "0.npy"
    np.save(path, np.zeros((H + 2, W), np.float32))
    # The size used to come from this label, so image/0.npy was blamed.
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} has shape \({H + 2}, {W}\) but .*image.0\.npy, "
                                         rf"of shape \({H}, {W}, 3\), is {H}x{W} pixels"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    np.save(path, np.zeros((H, W), np.float32))
    later = tmp_path / "train" / "label" / "2.npy"
    np.save(later, np.zeros((H + 2, W), np.float32))
    with pytest.raises(ValueError, match=rf"{re.escape(str(later))} has shape \({H + 2}, {W}\) but the split's "
                                         rf"first label, 0\.npy, is \({H}, {W}\)"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})


@pytest.mark.parametrize("height, width", [(1, W), (H, 1)])
def test_one_pixel_tall_or_wide_labels_with_a_channel_axis_are_read_at_their_images_size(tmp_path, height, width):
    # (1,W,1) is a (1,W) map with a channel last or a (W,1) map with a channel first: the
    # image's size decides. It used to be read as (W,1) whatever the image, and refused.
    for split, numbers in (("train", range(3)), ("val", range(2))):
        for folder in ("image", "label", "depth"):
            (tmp_path / split / folder).mkdir(parents=True)
        for n in numbers:
            labels = (np.arange(height * width, dtype=np.float32).reshape(height, width) + n) % 7
            np.save(tmp_path / split / "image" / f"{n}.npy", np.full((height, width, 3), 0.5, np.float32))
            np.save(tmp_path / split / "label" / f"{n}.npy",
                    labels[..., None] if height == 1 else labels[None])  # (1,W,1) either way
            np.save(tmp_path / split / "depth" / f"{n}.npy", np.ones((height, width), np.float32))
    train, val = load_npy_splits({"name": "cityscapes", "root": tmp_path})
    assert train.targets["segmentation"].shape == (3, height, width) and len(val) == 2
    expected = (np.arange(height * width).reshape(height, width) + 2) % 7
    assert np.array_equal(train.targets["segmentation"][2].numpy(), expected)


@pytest.mark.parametrize("folder, array", [
    ("depth", np.full((H, W), 1e300)),
    ("normal", np.full((H, W, 3), 1e39)),
])
def test_finite_values_beyond_float32_are_refused_not_made_invalid(tmp_path, folder, array):
    write_pair(tmp_path)
    path = tmp_path / "train" / folder / "1.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: .* holds 1e\+(300|39), beyond the float32 range"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    # Non-finite values are still invalid pixels (0), as documented.
    array = array.copy()
    array[...] = np.inf
    np.save(path, array)
    train = load_npy_splits({"name": "nyuv2", "root": tmp_path})[0]
    assert (train.targets[folder][1] == 0).all()


@pytest.mark.parametrize("folder", ["image", "label", "depth", "normal"])
def test_an_npz_archive_under_an_npy_name_is_refused_naming_the_file(tmp_path, folder):
    """np.load opens a zip archive whatever its name: it used to fail with an AttributeError
    ('NpzFile' object has no attribute 'dtype') naming no file."""
    import io

    write_pair(tmp_path)
    path = tmp_path / "train" / folder / "1.npy"
    archive = io.BytesIO()
    np.savez(archive, a=np.load(path))
    path.write_bytes(archive.getvalue())
    with pytest.raises(ValueError, match=rf"cannot read {re.escape(str(path))}: it is an \.npz archive"):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})


# --------------------------------------------------------------------------- dataset keys


def _same_splits(a, b) -> bool:
    return all(x.instance_ids == y.instance_ids and torch.equal(x.images, y.images)
               and x.tasks == y.tasks and all(torch.equal(x.targets[t], y.targets[t]) for t in x.tasks)
               for x, y in zip(a, b))


def _noise_fields():
    from dataclasses import asdict

    from unlearning.data.renderer import NoiseOptions

    return asdict(NoiseOptions())


FULL_INDOOR = {"name": "indoor", "n_train": 160, "n_test": 48, "height": 48, "width": 64, "seed": 0}


@pytest.mark.parametrize("written", [
    {"name": "indoor"},  # what `unlearnd train --dataset indoor` records
    {"name": "indoor", "seed": 0, "height": 48},
    {"name": "indoor", "noise": None},
    {"name": "indoor", "noise": {"label_flip": 0.2}},
    {**FULL_INDOOR, "noise": _noise_fields()},
    {**FULL_INDOOR, "n_train": np.int64(160)},
])
def test_specs_of_the_same_synthetic_data_share_one_key(written):
    """Tombstones belong to the key: specs written differently used to get keys of their own,
    so an erasure through one model was not erased data for another on the same data."""
    from unlearning.data import canonical_spec, dataset_key

    assert dataset_key(written) == dataset_key(FULL_INDOOR)
    assert dataset_key(written).startswith("indoor-")
    assert canonical_spec(written) == canonical_spec(FULL_INDOOR) == FULL_INDOOR


def test_equal_keys_render_identical_tensors():
    """The premise: specs that share a key are the same data, tensor for tensor."""
    from unlearning.data import dataset_key

    small = {"name": "street", "n_train": 3, "n_test": 2, "height": 12, "width": 16}
    variants = [{**small, "seed": 0}, {**small, "noise": _noise_fields()},
                {**small, "noise": "clean"}, {**small, "noise": {k: 0 for k in _noise_fields()}}]
    assert len({dataset_key(v) for v in [small, *variants[:2]]}) == 1
    assert dataset_key(variants[2]) == dataset_key(variants[3]) != dataset_key(small)
    assert _same_splits(load_splits(small), load_splits(variants[0]))
    assert _same_splits(load_splits(small), load_splits(variants[1]))
    assert _same_splits(load_splits(variants[2]), load_splits(variants[3]))


@pytest.mark.parametrize("change", [
    {"n_train": 161}, {"n_test": 47}, {"height": 32}, {"width": 32}, {"seed": 1}, {"name": "street"},
    {"noise": "clean"}, *({"noise": {field: 0.0}} for field in _noise_fields()),
    {"noise": {"depth_sigma": 0.03}},
])
def test_every_value_that_changes_synthetic_data_changes_the_key(change):
    from unlearning.data import dataset_key

    assert dataset_key({**FULL_INDOOR, **change}) != dataset_key(FULL_INDOOR)
    assert dataset_key({**FULL_INDOOR, **change}) != dataset_key({"name": "indoor"})


def test_the_defaults_written_out_are_the_ones_the_loader_uses(monkeypatch):
    """canonical_spec writes out what load_synthetic fills in: the sizes, the seed, the noise."""
    import unlearning.data.synthetic as synthetic
    from unlearning.data import canonical_spec

    seen = []

    def fake_render(name, seeds, height, width, noise, workers=1):
        seen.append((len(seeds), {s[0] for s in seeds}, height, width, noise))
        n = len(seeds)
        return {"image": torch.zeros(n, 3, height, width), "segmentation": torch.zeros(n, height, width, dtype=torch.long),
                "depth": torch.zeros(n, 1, height, width), "normal": torch.zeros(n, 3, height, width)}

    monkeypatch.setattr(synthetic, "render_batch", fake_render)
    load_synthetic({"name": "indoor"})
    spec = canonical_spec({"name": "indoor"})
    (n_train, seeds, height, width, noise), (n_test, *_) = seen
    assert (n_train, n_test, seeds, height, width) == (spec["n_train"], spec["n_test"], {spec["seed"]},
                                                        spec["height"], spec["width"])
    assert "noise" not in spec and noise == synthetic.noise_options({"name": "indoor"})


@pytest.mark.parametrize("root", ["/data/nyu/", "/data/./nyu", "/data//nyu", "/data/x/../nyu"])
def test_an_npy_root_written_differently_is_one_dataset(root):
    import pathlib

    from unlearning.data import canonical_spec, dataset_key

    plain = {"name": "nyuv2", "root": "/data/nyu"}
    assert dataset_key({"name": "nyuv2", "root": root}) == dataset_key(plain)
    assert dataset_key({"name": "nyuv2", "root": pathlib.Path(root)}) == dataset_key(plain)
    assert dataset_key({**plain, "num_classes": 13, "limit": None}) == dataset_key(plain)
    assert canonical_spec({"name": "nyuv2", "root": root}) == {**plain, "num_classes": 13, "limit": None}


@pytest.mark.parametrize("change", [
    {"root": "/data/nyu2"}, {"root": "/data"}, {"root": "data/nyu"}, {"num_classes": 12}, {"limit": 5},
    {"name": "cityscapes"},
])
def test_every_value_that_changes_npy_data_changes_the_key(change):
    from unlearning.data import dataset_key

    plain = {"name": "nyuv2", "root": "/data/nyu"}
    assert dataset_key({**plain, **change}) != dataset_key(plain)


def test_npy_roots_are_normalised_lexically_not_through_symlinks(tmp_path):
    """The API and a worker may mount the data at other paths: a root is compared as written
    (normalised), never resolved. Both spellings of one folder still load the same data."""
    import os

    from unlearning.data import dataset_key

    write_pair(tmp_path / "nyu")
    os.symlink(tmp_path / "nyu", tmp_path / "link")
    plain = {"name": "nyuv2", "root": str(tmp_path / "nyu")}
    dotted = {"name": "nyuv2", "root": f"{tmp_path}/./nyu/"}
    assert dataset_key(dotted) == dataset_key(plain)
    assert _same_splits(load_splits(dotted), load_splits(plain))
    assert dataset_key({"name": "nyuv2", "root": str(tmp_path / "link")}) != dataset_key(plain)


@pytest.mark.parametrize("spec", [
    {"name": "indoor", "n_train": 2.5}, {"name": "indoor", "noise": {"depht_sigma": 0.1}},
    {"name": "indoor", "noise": "loud"}, {"name": "indoor", "noise": {"label_flip": float("nan")}},
    {"name": "nyuv2"}, {"name": "cityscapes", "root": ""}, {"name": "mnist", "size": 3}, {},
])
def test_canonical_spec_keeps_what_the_loader_would_refuse(spec):
    """Specs are keyed before they are loaded (the settings' nyuv2 has no root): a value the
    loader refuses is kept as given, not refused or dropped, and the key stays the spec's."""
    import json

    from unlearning.data import canonical_spec, dataset_key

    canonical = canonical_spec(spec)
    assert {k: json.dumps(canonical[k]) for k in spec} == {k: json.dumps(v) for k, v in spec.items()}
    assert canonical_spec(canonical) == canonical  # idempotent
    assert dataset_key(spec).startswith(f"{spec.get('name')}-")


def test_canonical_spec_is_idempotent_and_json():
    import json

    from unlearning.data import canonical_spec

    for spec in ({"name": "street", "noise": "clean"}, {"name": "indoor", "noise": {"image_sigma": 0.5}},
                 {"name": "cityscapes", "root": "/d/./c/", "limit": np.int64(4)}):
        canonical = canonical_spec(spec)
        assert canonical_spec(canonical) == canonical
        assert json.loads(json.dumps(canonical)) == canonical
    with pytest.raises(ValueError, match="a dataset spec is a dict"):
        canonical_spec("indoor")


def test_load_reference_renders_the_scenes_after_the_test_split_and_refuses_what_it_cannot():
    from unlearning.data import load_reference

    spec = {"name": "street", "n_train": 2, "n_test": 3, "height": 8, "width": 8, "seed": 5}
    reference, larger = load_reference(spec, 2), load_splits({**spec, "n_test": 5})[1]
    assert reference.instance_ids == larger.instance_ids[3:] and torch.equal(reference.images, larger.images[3:])
    assert not set(reference.instance_ids) & set(load_splits(spec)[1].instance_ids)
    for n in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="must be a positive integer"):
            load_reference(spec, n)
    with pytest.raises(ValueError, match="the 'nyuv2' dataset is not synthetic"):
        load_reference({"name": "nyuv2", "root": "/nowhere"}, 2)
    with pytest.raises(ValueError, match="'n_test' in the 'street' dataset spec must be an integer"):
        load_reference({**spec, "n_test": "3"}, 2)


def test_the_synthetic_datasets_are_the_renderers_flavours():
    from unlearning.data import DATASETS, SYNTHETIC_DATASETS
    from unlearning.data.renderer import FLAVOUR_TASKS

    assert set(SYNTHETIC_DATASETS) == set(FLAVOUR_TASKS) and set(SYNTHETIC_DATASETS) < set(DATASETS)


def test_a_sample_file_that_is_not_a_regular_file_is_refused_naming_it(tmp_path):
    """A FIFO named like a sample (or a link to one) blocked the loader, and the worker with it."""
    import os

    write_pair(tmp_path)
    fifo = tmp_path / "train" / "depth" / "1.npy"
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=re.escape(f"cannot read {fifo}: it is not a regular file")):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})
    image = tmp_path / "train" / "image" / "0.npy"  # the one the memory check reads a header of
    kept = image.read_bytes()
    image.unlink()
    os.mkfifo(image)
    from unlearning.resources import data_needs

    assert data_needs({"name": "nyuv2", "root": tmp_path}) == {}  # not blocked: the loader names it
    image.unlink()
    image.write_bytes(kept)
    fifo.unlink()
    fifo.symlink_to(tmp_path / "nowhere.npy")
    with pytest.raises(ValueError, match=re.escape(f"cannot read {fifo}: ")):
        load_npy_splits({"name": "nyuv2", "root": tmp_path})


def test_sample_numbers_are_ascii_digits_and_nothing_after_them(tmp_path):
    """'٢.npy' (an Arabic-Indic two) and '1.npy\\n' were taken as samples 2 and 1."""
    write_pair(tmp_path)
    np.save(tmp_path / "train" / "label" / "\u0662.npy", np.zeros((H, W), np.float32))
    (tmp_path / "train" / "depth" / "1.npy\n").write_bytes((tmp_path / "train" / "depth" / "1.npy").read_bytes())
    train, _ = load_npy_splits({"name": "nyuv2", "root": tmp_path})
    assert len(train) == 3


@pytest.mark.parametrize("channel_last", [True, False])
def test_the_memory_an_npy_dataset_will_hold_is_known_before_loading(tmp_path, channel_last):
    """data_needs counted nothing for datasets read from files: full-size NYUv2 (~16 GB) got
    the process killed part-way through loading on a smaller host. It is read from the folder
    listing and the first image's header; a dataset of millions of samples is refused unloaded."""
    from unlearning.resources import data_needs, memory_shortfall

    write_split(tmp_path, "train", range(3), channel_last=channel_last)
    write_split(tmp_path, "val", range(2), channel_last=channel_last, seed=1)
    spec = {"name": "nyuv2", "root": tmp_path}
    train, val = load_npy_splits(spec)
    held = sum(d.images.nbytes + sum(t.nbytes for t in d.targets.values()) for d in (train, val))
    needs = data_needs(spec)
    assert sum(needs.values()) == held and set(needs) == {"the 3 train samples of 48 pixels",
                                                         "the 2 val samples of 48 pixels"}
    assert sum(data_needs({**spec, "limit": 2}).values()) == held * 4 // 5
    header_only = tmp_path / "train" / "image" / "0.npy"  # a header claiming 480x640 x 10^6, no data
    with open(header_only, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (10**6 * 480, 640, 3)})
    assert "needs at least" in memory_shortfall(data_needs(spec))
    for broken in ({"name": "nyuv2", "root": tmp_path / "nowhere"}, {"name": "nyuv2"}, {"name": "nyuv2", "root": 3}):
        assert data_needs(broken) == {}  # the loader names what is wrong


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_integer_depth_is_refused_as_raw_units(tmp_path, dtype):
    """A uint16 depth of 3000 (raw millimetres) loaded as 3000 m: the depth loss and its
    absolute error off by 1000, silently."""
    refused(tmp_path, "train/depth/1.npy", np.full((H, W), 3000, dtype),
            rf" holds {np.dtype(dtype).name} depth; depth is read as floating-point metres")
    write_pair(tmp_path)
    np.save(tmp_path / "train" / "depth" / "1.npy", np.full((H, W), 3.0, np.float64))  # metres, as floats: taken
    assert float(load_npy_splits({"name": "nyuv2", "root": tmp_path})[0].targets["depth"][1].max()) == 3.0
