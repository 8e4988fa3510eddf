"""The memory lower bounds that refuse sizes no machine here can hold, before any work."""
from __future__ import annotations

import pytest

from unlearning.data import load_splits
from unlearning.model import ModelConfig, MultiTaskNet, parameter_count
from unlearning.resources import (data_needs, human, machine_memory, memory_shortfall, scene_bytes,
                                  training_needs)


@pytest.mark.parametrize("cfg", [
    ModelConfig({"segmentation": 13, "depth": 1, "normal": 3}),
    ModelConfig({"depth": 1}, width=12, depth=5, head_width=8),
    ModelConfig({"segmentation": 7, "depth": 1}, in_channels=1, width=16, depth=1, head_width=16),
])
def test_parameter_count_is_the_built_models(cfg):
    assert parameter_count(cfg) == sum(p.numel() for p in MultiTaskNet(cfg).parameters())


@pytest.mark.parametrize("name", ["indoor", "street"])
def test_scene_bytes_is_what_a_rendered_dataset_holds(name):
    spec = {"name": name, "n_train": 3, "n_test": 2, "height": 6, "width": 10}
    train, test = load_splits(spec)
    held = sum(d.images.nbytes + sum(t.nbytes for t in d.targets.values()) for d in (train, test))
    assert held == 5 * scene_bytes(train.tasks, 6, 10)
    assert sum(data_needs(spec).values()) == held
    extra = data_needs(spec, reference_scenes=4)
    assert sum(extra.values()) == held + 4 * scene_bytes(train.tasks, 6, 10) and "4 reference scenes" in extra


def test_data_needs_leave_files_and_refused_specs_to_the_loader():
    assert data_needs({"name": "nyuv2", "root": "/data"}) == {}
    assert data_needs({"name": "indoor", "height": 2.5}) == {}
    assert data_needs(None) == {}


def test_a_shortfall_names_each_need_and_what_the_machine_has():
    needs = {"the data": 3 << 30, "the model": 1 << 20}
    assert memory_shortfall(needs, have=4 << 30) is None
    message = memory_shortfall(needs, have=2 << 30)
    assert message == ("needs at least 3.0 GiB of memory (the data: 3.0 GiB; the model: 1.0 MiB), "
                       "more than the 2.0 GiB this machine has")
    assert human(512) == "512 B" and human(5 << 40) == "5.0 TiB" and human(10**30) == "9.1e+17 TiB"


def test_the_machine_has_memory_and_a_default_model_fits_it():
    have = machine_memory()
    assert have is not None and have > 1 << 30
    cfg = ModelConfig({"segmentation": 13, "depth": 1, "normal": 3})
    assert memory_shortfall({**data_needs({"name": "indoor"}), **training_needs(cfg)}) is None
