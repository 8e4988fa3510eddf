"""The renderer's outputs agree with one geometry, and with each other."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from unlearning.data.renderer import (
    INDOOR_CLASSES,
    STREET_CLASSES,
    Boxes,
    Camera,
    Cylinders,
    Light,
    Material,
    NoiseOptions,
    Planes,
    Scene,
    Spheres,
    make_scene,
    render,
    render_batch,
    render_workers,
    render_scene,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SEEDS = (0, 1, 2, 3)


def world_points(r):
    """World 3D points (H,W,3) of a render's depth, back-projected with the camera intrinsics."""
    cam = r.scene.camera
    return cam.to_world(cam.backproject(r.depth))


def normals_from_depth(r):
    """Normals estimated from depth alone (cross product of central differences of the
    back-projected points), on interior pixels whose 3x3 neighbourhood is one primitive
    with valid depth; returns (estimated, rendered) normals of those pixels."""
    p = r.scene.camera.backproject(r.depth).double()
    dx = p[1:-1, 2:] - p[1:-1, :-2]
    dy = p[2:, 1:-1] - p[:-2, 1:-1]
    est = F.normalize(torch.linalg.cross(dx, dy), dim=-1)
    # Face the camera, as the rendered normals do.
    est = torch.where(((est * p[1:-1, 1:-1]).sum(-1) > 0)[..., None], -est, est)
    prim, valid = r.primitive, r.depth[0] > 0
    ok = torch.ones_like(valid[1:-1, 1:-1])
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            win = (slice(1 + di, prim.shape[0] - 1 + di), slice(1 + dj, prim.shape[1] - 1 + dj))
            ok &= (prim[win] == prim[1:-1, 1:-1]) & valid[win]
    rendered = r.normal[:, 1:-1, 1:-1].permute(1, 2, 0).double()
    return est[ok], rendered[ok]


@pytest.mark.parametrize("flavour", ["indoor", "street"])
def test_normals_agree_with_depth_gradients(flavour):
    angles = []
    for seed in SEEDS:
        est, rendered = normals_from_depth(render_scene(flavour, seed, noise=None))
        angles.append(torch.rad2deg(torch.acos((est * rendered).sum(-1).clamp(-1, 1))))
    angles = torch.cat(angles)
    assert len(angles) > 1000
    # Pixels on a box edge see two faces inside one primitive; they are the few exceptions.
    assert (angles < 10).double().mean() > 0.95
    assert angles.median() < 1.0


@pytest.mark.parametrize("flavour", ["indoor", "street"])
def test_rendered_normals_are_unit_and_face_the_camera(flavour):
    r = render_scene(flavour, 5, noise=None)
    n = r.normal.permute(1, 2, 0)
    hit = r.depth[0] > 0  # within sensor range
    assert torch.allclose(n[hit].norm(dim=-1), torch.ones(int(hit.sum())), atol=1e-5)
    assert (n[~hit] == 0).all()
    rays = r.scene.camera.rays().reshape(*hit.shape, 3).float()
    assert ((n * rays).sum(-1)[hit] < 0).all()


@pytest.mark.parametrize("flavour", ["indoor", "street"])
def test_labels_come_from_the_primitive_hit(flavour):
    r = render_scene(flavour, 7, noise=None)
    hit = r.primitive >= 0
    assert torch.equal(r.segmentation[hit], r.scene.labels[r.primitive[hit]])
    assert (r.segmentation >= 0).all()


def test_indoor_floor_walls_and_ceiling_match_their_planes():
    floor, wall, ceiling = (INDOOR_CLASSES.index(c) for c in ("floor", "wall", "ceiling"))
    counts = dict.fromkeys((floor, wall, ceiling), 0)
    for seed in SEEDS:
        r = render_scene("indoor", seed, noise=None)
        cam, planes = r.scene.camera, r.scene.shapes[0]
        p = world_points(r)
        n_world = r.normal.permute(1, 2, 0).double() @ cam.rotation.T.double()
        seg = r.segmentation
        assert (r.depth[0] > 0).all()  # a closed room within sensor range
        # Floor: at height 0, normal straight up.
        assert p[seg == floor][:, 1].abs().max() < 1e-3
        assert (n_world[seg == floor][:, 1] > 0.9999).all()
        # Ceiling: at the ceiling plane's height, normal straight down.
        height = float(planes.offset[1])
        assert ((p[seg == ceiling][:, 1] - height).abs() < 1e-3).all()
        assert (n_world[seg == ceiling][:, 1] < -0.9999).all()
        # Walls: vertical, so horizontal normals.
        assert n_world[seg == wall][:, 1].abs().max() < 1e-4
        for c in counts:
            counts[c] += int((seg == c).sum())
    assert counts[floor] > 0 and counts[wall] > 0


def test_sphere_and_cylinder_pixels_lie_on_their_surfaces():
    found = {"sphere": 0, "cylinder": 0}
    for seed in range(8):
        r = render_scene("indoor", seed, noise=None)
        scene, p = r.scene, world_points(r)
        for index in r.primitive.unique().tolist():
            if index < 0:
                continue
            kind, k = scene.locate(index)
            pts = p[r.primitive == index]
            if kind == "sphere":
                s = scene.shapes[2]
                dist = (pts - s.center[k].double()).norm(dim=-1)
                assert (dist - float(s.radius[k])).abs().max() < 2e-3
                assert scene.labels[index] == INDOOR_CLASSES.index("sphere")
            elif kind == "cylinder":
                c = scene.shapes[3]
                rho = (pts[:, [0, 2]] - c.center[k, [0, 2]].double()).norm(dim=-1)
                assert (rho <= float(c.radius[k]) + 2e-3).all()
                assert (pts[:, 1] >= float(c.y0[k]) - 2e-3).all() and (pts[:, 1] <= float(c.y1[k]) + 2e-3).all()
                assert scene.labels[index] == INDOOR_CLASSES.index("cylinder")
            else:
                continue
            found[kind] += len(pts)
    assert found["sphere"] > 0 and found["cylinder"] > 0


def test_street_sky_has_no_depth_and_road_is_the_ground():
    sky, road = STREET_CLASSES.index("sky"), STREET_CLASSES.index("road")
    for seed in SEEDS:
        r = render_scene("street", seed, noise=None)
        seg, depth = r.segmentation, r.depth[0]
        assert (seg == sky).any()
        assert torch.equal(seg == sky, r.primitive < 0)
        assert (depth[seg == sky] == 0).all()
        near_road = (seg == road) & (depth > 0)
        assert world_points(r)[near_road][:, 1].abs().max() < 1e-2
        assert depth.max() <= 80.0


def _single_object_scene(kind, shape, size=5):
    """A scene with one primitive in front of a camera at the origin looking along +z."""
    empty = {
        "plane": Planes(torch.zeros(0, 3), torch.zeros(0)),
        "box": Boxes(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0)),
        "sphere": Spheres(torch.zeros(0, 3), torch.zeros(0)),
        "cylinder": Cylinders(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0), torch.zeros(0)),
    }
    empty[kind] = shape
    material = Material(torch.zeros(1, dtype=torch.long), torch.ones(1), torch.tensor([[1.0, 0, 0]]),
                        torch.zeros(1, 3), torch.full((1, 3), 0.5), torch.full((1, 3), 0.5))
    light = Light(0.3, 1.0, torch.ones(3), direction=torch.tensor([0.0, 0.0, -1.0]))
    camera = Camera.looking(size, size, 60.0, (0.0, 0.0, 0.0), yaw=0.0, pitch=0.0)
    return Scene("street", (0,), camera, tuple(empty.values()), torch.tensor([3]), material, light,
                 torch.tensor([[0.8, 0.8, 0.9], [0.3, 0.5, 0.9]]), torch.rand(16, 16, 16))


@pytest.mark.parametrize(
    "kind, shape, depth, world_normal",
    [
        ("sphere", Spheres(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([1.0])), 4.0, (0, 0, -1)),
        ("cylinder", Cylinders(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([1.0]), torch.tensor([-1.0]),
                               torch.tensor([1.0])), 4.0, (0, 0, -1)),
        ("box", Boxes(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([0.0])),
         4.0, (0, 0, -1)),
        # Turned by 30 degrees the ray along the axis meets the box's z face at 5 - 1/cos(30).
        ("box", Boxes(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([[1.0, 1.0, 1.0]]),
                      torch.tensor([math.radians(30)])), 5 - 1 / math.cos(math.radians(30)),
         (-math.sin(math.radians(30)), 0, -math.cos(math.radians(30)))),
        ("plane", Planes(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([6.0])), 6.0, (0, 0, -1)),
    ],
)
def test_hand_built_scenes_give_the_analytic_depth_and_normal(kind, shape, depth, world_normal):
    r = render(_single_object_scene(kind, shape))
    cam = r.scene.camera
    assert r.depth[0, 2, 2].item() == pytest.approx(depth, abs=1e-4)
    expected = cam.direction_to_camera_frame(torch.tensor(world_normal, dtype=torch.float32))
    assert torch.allclose(r.normal[:, 2, 2], expected.float(), atol=1e-4)
    assert r.segmentation[2, 2] == 3


def test_same_seed_same_render_and_different_seeds_differ():
    for flavour in ("indoor", "street"):
        a, b = render_scene(flavour, 11), render_scene(flavour, 11)
        for key in ("image", "segmentation", "depth", "normal"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        c = render_scene(flavour, 12)
        assert not torch.equal(a.image, c.image) and not torch.equal(a.depth, c.depth)
    assert not torch.equal(render_scene("indoor", (0, 0, 1)).image, render_scene("indoor", (0, 1, 0)).image)
    assert not torch.equal(render_scene("indoor", (1, 2)).image, render_scene("indoor", (1, 2, 0)).image)


def test_noise_perturbs_but_keeps_the_geometry():
    clean, noisy = render_scene("indoor", 3, noise=None), render_scene("indoor", 3)
    assert torch.equal(clean.primitive, noisy.primitive)  # same scene
    valid = noisy.depth > 0
    assert 0 < (~valid).sum() < 0.05 * valid.numel()  # a few dropped pixels
    ratio = noisy.depth[valid] / clean.depth[valid]
    assert (ratio - 1).abs().max() < 0.15 and (ratio - 1).abs().mean() > 1e-3
    assert (noisy.normal[:, ~valid[0]] == 0).all()  # no normal where the sensor saw no depth
    changed = noisy.segmentation != clean.segmentation
    assert 0 < changed.sum() < 0.1 * changed.numel()
    assert (noisy.segmentation == -1).any()
    # Label noise stays on class boundaries.
    seg = clean.segmentation
    pad = F.pad(seg[None, None].double(), (1, 1, 1, 1), mode="replicate")[0, 0]
    boundary = (torch.stack([pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]]) != seg).any(0)
    assert not (changed & ~boundary).any()
    diff = (noisy.image - clean.image).abs().mean()
    assert 0.005 < diff < 0.05


def test_switching_one_noise_off_leaves_the_others_unchanged():
    full = render_scene("street", 4)
    no_image_noise = render_scene("street", 4, noise=NoiseOptions(image_sigma=0.0))
    assert torch.equal(full.segmentation, no_image_noise.segmentation)
    assert torch.equal(full.depth, no_image_noise.depth)
    assert not torch.equal(full.image, no_image_noise.image)
    clean = render_scene("street", 4, noise=NoiseOptions.clean())
    assert torch.equal(clean.depth, render_scene("street", 4, noise=None).depth)


def test_noise_options_reject_unknown_and_out_of_range_values():
    with pytest.raises(ValueError, match="depth_sigmaa"):
        NoiseOptions.from_dict({"depth_sigmaa": 0.1})
    with pytest.raises(ValueError, match="label_flip"):
        NoiseOptions.from_dict({"label_flip": 1.5})


@pytest.mark.parametrize("key, value, expected", [
    ("depth_sigma", math.inf, r"a standard deviation in \[0, 1\]"),  # gave infinite depth
    ("normal_sigma", math.inf, r"a standard deviation in \[0, 1\]"),  # gave NaN normals
    ("image_sigma", math.nan, r"a standard deviation in \[0, 1\]"),
    ("depth_sigma", -0.1, r"a standard deviation in \[0, 1\]"),
    ("normal_sigma", 10**400, r"a standard deviation in \[0, 1\]"),  # an int no float holds
    ("label_flip", True, r"a probability, a number in \[0, 1\]"),  # was float()-ed to 1.0
    ("label_flip", "0.5", r"a probability, a number in \[0, 1\]"),  # was float()-ed to 0.5
    ("label_ignore", None, r"a probability, a number in \[0, 1\]"),
    ("depth_dropout", 1.5, r"a probability, a number in \[0, 1\]"),
    ("image_sigma", "0.1", r"a standard deviation in \[0, 1\]"),
    ("normal_sigma", 1e39, r"a standard deviation in \[0, 1\]"),  # finite, but past float32: NaN normals
    ("depth_sigma", 1.5, r"a standard deviation in \[0, 1\]"),
])
def test_noise_options_must_be_finite_real_numbers(key, value, expected):
    """Each noise value is checked, not float()-ed: a bool, a string, an infinity or a NaN
    is refused naming the option, what it must be and the value given."""
    with pytest.raises(ValueError, match=f"noise option '{key}' must be {expected}, got {re.escape(repr(value))}"):
        NoiseOptions.from_dict({key: value})


def test_noise_options_take_any_real_number_in_range_as_its_float():
    import numpy as np

    given = NoiseOptions.from_dict({"depth_sigma": 0, "label_flip": 1, "image_sigma": np.float64(0.05)})
    assert given == NoiseOptions.from_dict({"depth_sigma": 0.0, "label_flip": 1.0, "image_sigma": 0.05})
    assert all(type(getattr(given, k)) is float for k in ("depth_sigma", "label_flip", "image_sigma"))


def test_batches_sizes_and_scene_parameters():
    batch = render_batch("street", [0, 1, 2], height=24, width=40)
    assert batch["image"].shape == (3, 3, 24, 40) and batch["image"].dtype == torch.float32
    assert set(batch) == {"image", "segmentation", "depth"}
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    big = render_scene("indoor", 0, height=96, width=128, noise=None)
    assert big.depth.shape == (1, 96, 128)
    assert make_scene("indoor", 0).camera.fx == pytest.approx(make_scene("indoor", 0, 48, 64).camera.fx)
    with pytest.raises(ValueError, match="flavour"):
        make_scene("forest", 0)


def test_worker_processes_render_the_same_tensors():
    seeds = [(0, 0, i) for i in range(5)]
    serial = render_batch("indoor", seeds, height=16, width=24)
    parallel = render_batch("indoor", seeds, height=16, width=24, workers=2)
    assert serial.keys() == parallel.keys()
    assert all(torch.equal(serial[k], parallel[k]) for k in serial)
    # "auto" keeps small renders in this process; large ones get a process per 8 scenes at most
    assert render_workers(5, 16, 24) == 1 and 1 <= render_workers(795, 288, 384) <= 795 // 8
    empty = render_batch("street", (s for s in ()), height=8, width=8)  # a generator, empty
    assert empty["image"].shape == (0, 3, 8, 8) and empty["segmentation"].dtype == torch.long


@pytest.mark.parametrize("key, value, expected", [
    ("depth_sigma", math.inf, r"a standard deviation in \[0, 1\]"),  # gave infinite depth
    ("normal_sigma", math.inf, r"a standard deviation in \[0, 1\]"),  # gave NaN normals
    ("label_flip", "0.5", r"a probability, a number in \[0, 1\]"),  # a TypeError inside the render
    ("depth_dropout", -1, r"a probability, a number in \[0, 1\]"),  # silently no dropout
])
def test_noise_options_built_directly_are_checked_too(key, value, expected):
    """Only ``from_dict`` used to check the values: ``NoiseOptions(...)``, as a researcher
    writes it, rendered non-finite targets or failed deep inside the render."""
    with pytest.raises(ValueError, match=f"noise option '{key}' must be {expected}, got {re.escape(repr(value))}"):
        NoiseOptions(**{key: value})
    given = NoiseOptions(depth_sigma=0, label_flip=1)
    assert type(given.depth_sigma) is float and given == NoiseOptions.from_dict({"depth_sigma": 0.0, "label_flip": 1.0})


@pytest.mark.parametrize("seed", [2.5, True, "3", (1.7, 0), (0, -1), -1, None])
def test_seeds_that_are_not_non_negative_integers_are_refused(seed):
    """A seed used to be int()-ed: 2.5 rendered seed 2's scene, True seed 1's, "3" seed 3's."""
    with pytest.raises(ValueError, match=rf"seeds must be non-negative integers or tuples of them, "
                                         rf"got {re.escape(repr(seed))}"):
        make_scene("indoor", seed, 8, 8)


def test_numpy_integer_seeds_render_as_their_int():
    import numpy as np

    a, b = render_scene("street", (np.int64(3), 1), 8, 8), render_scene("street", (3, 1), 8, 8)
    assert a.scene.seed == (3, 1) and torch.equal(a.image, b.image) and torch.equal(a.depth, b.depth)


@pytest.mark.parametrize("height, width", [(2.5, 16), ("16", 16), (16, True), (1, 16), (-3, 16)])
def test_image_sizes_that_are_not_integers_of_at_least_2_are_refused(height, width):
    """A size of 2.5 made a scene that failed later in a reshape, "16" a TypeError; an empty
    batch of a negative size failed in torch.zeros."""
    message = rf"image size must be integers of at least 2x2, got {re.escape(repr(height))}x{re.escape(repr(width))}"
    with pytest.raises(ValueError, match=message):
        make_scene("indoor", 0, height, width)
    with pytest.raises(ValueError, match=message):
        render_batch("indoor", [], height, width)


@pytest.mark.parametrize("workers", [0, -2, 2.7, "x", "2", True])
def test_render_workers_must_be_a_positive_integer_or_auto(workers):
    """0 and -2 used to be taken as 1, 2.7 as 2 and "2" as 2; "x" failed inside int()."""
    with pytest.raises(ValueError, match=f"workers must be a positive integer or 'auto', got {re.escape(repr(workers))}"):
        render_batch("indoor", [0, 1], 8, 8, workers=workers)
