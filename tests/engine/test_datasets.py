"""Synthetic datasets, the .npy loaders and cell erasure."""
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
