"""Procedural ray-cast scenes: image, labels, depth and normals from one geometry.

A scene is a handful of primitives (planes, boxes rotated about the vertical,
spheres, capped vertical cylinders), a pinhole camera and one light. For every
pixel one ray is cast through the pixel centre and the nearest hit decides
everything: the z-depth (distance along the optical axis, metres), the surface
normal (camera frame, unit, facing the camera), the class (of the primitive hit)
and the colour (textured albedo, Lambert + ambient, cast shadows). So depth,
normals and shading are physically consistent, which is what lets a model
*infer* them; the sensor and annotation noise added on top (see
:class:`NoiseOptions`) is what a model can only *memorise*, as with real data.

Conventions:

- world frame: y up, metres; camera frame (OpenCV): x right, y down, z forward;
- pixel ``(i, j)`` looks through ``u = j + 0.5, v = i + 0.5``;
  ``x = (u - cx) / fx * z``, ``y = (v - cy) / fy * z`` (see :meth:`Camera.backproject`);
- image: float32 (3,H,W) in [0, 1] (gamma-encoded);
- segmentation: long (H,W), -1 = ignore; depth: float32 (1,H,W), 0 = invalid;
  normal: float32 (3,H,W) unit vectors, all-zero = invalid.

Flavours and classes:

- ``indoor`` (segmentation, depth, normal), :data:`INDOOR_CLASSES`:
  0 floor, 1 wall, 2 ceiling, 3 box (furniture), 4 sphere, 5 cylinder.
  A closed room (six planes) with furniture boxes, balls and columns, lit by
  a point light under the ceiling. Depth beyond 10 m is invalid.
- ``street`` (segmentation, depth), :data:`STREET_CLASSES`:
  0 road, 1 sidewalk, 2 building, 3 car, 4 pole, 5 vegetation, 6 sky.
  A ground plane (road) with raised sidewalk slabs, building blocks along both
  sides, cars (body and cabin boxes), poles (cylinders), trees (trunk
  cylinder + crown sphere, both vegetation), sky where no ray hits (depth 0),
  lit by the sun. Depth beyond 80 m is invalid (stereo range), the class stays.

Everything is a function of the seed: the scene's random numbers and the
noise's come from two separate streams, so changing noise options never
changes the geometry, and each noise component draws its numbers whether or
not it is enabled, so switching one off leaves the others as they were.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

INDOOR_CLASSES = ("floor", "wall", "ceiling", "box", "sphere", "cylinder")
STREET_CLASSES = ("road", "sidewalk", "building", "car", "pole", "vegetation", "sky")
FLAVOUR_CLASSES = {"indoor": INDOOR_CLASSES, "street": STREET_CLASSES}
FLAVOUR_TASKS = {"indoor": ("segmentation", "depth", "normal"), "street": ("segmentation", "depth")}
MAX_DEPTH = {"indoor": 10.0, "street": 80.0}

# float32 is ample (a 5 m depth is exact to ~1e-6 m, pixels are ~0.1 m apart) and
# runs ~1.6x faster than float64 on CPU.
DTYPE = torch.float32
_T_MIN = 1e-6
_SHADOW_BIAS = 1e-3
_RAY_CHUNK = 32768  # rays per intersection pass; bounds memory at large sizes
_NOISE_TABLE = 16  # value-noise lattice period

PLAIN, CHECKER, STRIPES, VALUE_NOISE = 0, 1, 2, 3
_NOISE_PROBABILITIES = ("depth_dropout", "label_flip", "label_ignore")


def _finite_real(value) -> bool:
    """``value`` is a real number (not a bool, not a string) that is finite as a float."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


@dataclass(frozen=True)
class NoiseOptions:
    """Sensor and annotation noise. Defaults are mild but non-zero; :meth:`clean` turns all off.

    - ``depth_sigma``: std of a spatially smooth multiplicative depth error;
    - ``depth_dropout``: fraction of pixels whose depth is missing (0); their
      normal is missing too, since real normals are derived from the depth;
    - ``normal_sigma``: std of a smooth perturbation of the normal vectors;
    - ``label_flip``: probability that a pixel on a class boundary takes the
      label of a random 4-neighbour (imprecise annotation outlines);
    - ``label_ignore``: probability that a boundary pixel is marked ignore (-1);
    - ``image_sigma``: std of per-pixel Gaussian image noise (image in [0, 1]).
    """

    depth_sigma: float = 0.02
    depth_dropout: float = 0.01
    normal_sigma: float = 0.02
    label_flip: float = 0.2
    label_ignore: float = 0.1
    image_sigma: float = 0.02

    def __post_init__(self):
        """``ValueError`` naming any value that is not a real number (a bool or a string is
        refused) in [0, 1]: the probabilities ``depth_dropout``, ``label_flip`` and
        ``label_ignore``, and the standard deviations. Checked here, not only in
        :meth:`from_dict`, so that options built directly are checked too."""
        for f in fields(self):
            k, v = f.name, getattr(self, f.name)
            # checked, not float()-ed: that took True as 1.0 and "0.5" as 0.5, and an infinite
            # sigma gave non-finite depth or normals. A std above 1 means nothing more here
            # (a depth error of 100%, normals pointing anywhere, an image all noise), and a
            # huge one overflows float32.
            if not _finite_real(v) or v < 0 or v > 1:
                expected = ("a probability, a number in [0, 1]" if k in _NOISE_PROBABILITIES
                            else "a standard deviation in [0, 1]")
                raise ValueError(f"noise option {k!r} must be {expected}, got {v!r}")
            object.__setattr__(self, k, float(v))

    @classmethod
    def clean(cls) -> "NoiseOptions":
        """No noise at all: outputs are exactly the geometry."""
        return cls(**{f.name: 0.0 for f in fields(cls)})

    @classmethod
    def from_dict(cls, options: dict) -> "NoiseOptions":
        """Build from a plain dict; ``ValueError`` naming any unknown key, and any value
        the constructor refuses."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown noise options {unknown}; known: {sorted(known)}")
        return cls(**options)


# --------------------------------------------------------------------------- camera


@dataclass(eq=False)
class Camera:
    """A pinhole camera: intrinsics in pixels and a pose (world-from-camera rotation, centre)."""

    height: int
    width: int
    fx: float
    fy: float
    cx: float
    cy: float
    rotation: torch.Tensor  # (3,3), columns: camera x (right), y (down), z (forward) in world
    position: torch.Tensor  # (3,)

    @classmethod
    def looking(cls, height: int, width: int, hfov_deg: float, position, yaw: float, pitch: float) -> "Camera":
        """A camera at ``position`` turned by ``yaw`` about the vertical and tilted by ``pitch`` (up > 0)."""
        f = width / (2.0 * math.tan(math.radians(hfov_deg) / 2.0))
        forward = torch.tensor(
            [math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)], dtype=DTYPE
        )
        right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=DTYPE))
        right = right / right.norm()
        down = torch.linalg.cross(forward, right)
        rotation = torch.stack([right, down, forward], dim=1)
        return cls(height, width, f, f, width / 2.0, height / 2.0, rotation, torch.as_tensor(position, dtype=DTYPE))

    def rays(self) -> torch.Tensor:
        """(H*W, 3) camera-frame directions with z = 1, so a ray's parameter is the z-depth."""
        v, u = torch.meshgrid(
            torch.arange(self.height, dtype=DTYPE) + 0.5, torch.arange(self.width, dtype=DTYPE) + 0.5, indexing="ij"
        )
        return torch.stack([(u - self.cx) / self.fx, (v - self.cy) / self.fy, torch.ones_like(u)], -1).reshape(-1, 3)

    def backproject(self, depth: torch.Tensor) -> torch.Tensor:
        """Camera-frame 3D points (H,W,3) of a z-depth map (H,W) or (1,H,W)."""
        depth = depth.reshape(self.height, self.width).to(DTYPE)
        return self.rays().reshape(self.height, self.width, 3) * depth[..., None]

    def to_world(self, points: torch.Tensor) -> torch.Tensor:
        """Camera-frame points (...,3) to world points."""
        return points.to(DTYPE) @ self.rotation.T + self.position

    def direction_to_camera_frame(self, vectors: torch.Tensor) -> torch.Tensor:
        """World-frame directions (...,3) to the camera frame."""
        return vectors.to(DTYPE) @ self.rotation


# --------------------------------------------------------------------------- primitives
# Each kind has ``intersect(origins, dirs) -> t`` with origins (P,3) or (1,3) (camera
# rays share one), dirs (P,3) and t (P,N) the ray parameter of the first hit (inf: a
# miss), and ``surface(points, index) -> (normal, local)`` for hit points (M,3) on
# primitives ``index`` (M,): the world normal (either orientation) and the point in
# the primitive's texture frame. Only t is computed for every (ray, primitive)
# pair; the surface only where a primitive is the nearest hit, which is what keeps
# the renderer fast.


def _safe(x: torch.Tensor, tiny: float = 1e-15) -> torch.Tensor:
    """``x`` with magnitudes below ``tiny`` replaced by ``tiny`` of the same sign (no division by 0)."""
    return torch.where(x.abs() < tiny, torch.where(x < 0, -tiny, tiny), x)


@dataclass(eq=False)
class Planes:
    """Infinite planes ``normal . x = offset``. Texture frame: world coordinates."""

    normal: torch.Tensor  # (N,3) unit
    offset: torch.Tensor  # (N,)
    kind = "plane"

    def __len__(self):
        return len(self.offset)

    def intersect(self, origins, dirs):
        t = (self.offset - origins @ self.normal.T) / _safe(dirs @ self.normal.T, 1e-12)
        return torch.where(t > _T_MIN, t, math.inf)

    def surface(self, points, index):
        return self.normal[index], points


@dataclass(eq=False)
class Boxes:
    """Boxes rotated by ``yaw`` about the vertical. Texture frame: box coordinates."""

    center: torch.Tensor  # (N,3)
    half: torch.Tensor  # (N,3) half extents in the box frame
    yaw: torch.Tensor  # (N,)
    kind = "box"

    def __len__(self):
        return len(self.yaw)

    @staticmethod
    def _to_box(v, cos, sin):
        """World vectors (...,3) into box frames (the inverse yaw rotation), broadcasting over boxes."""
        x, y, z = v[..., 0], v[..., 1], v[..., 2]
        return torch.stack([cos * x - sin * z, y.expand_as(cos * x), sin * x + cos * z], -1)

    def intersect(self, origins, dirs):
        cos, sin = torch.cos(self.yaw), torch.sin(self.yaw)
        o = self._to_box(origins[:, None, :] - self.center, cos, sin)
        d = self._to_box(dirs[:, None, :], cos, sin)
        # 1/0 = inf is handled by the slab test; only a ray exactly parallel to and exactly on
        # a face gives NaN, which counts as a miss.
        inv = 1.0 / d
        # Slab method: the ray is inside the box between the largest entry and the smallest exit.
        t1, t2 = (-self.half - o) * inv, (self.half - o) * inv
        near = torch.minimum(t1, t2).amax(-1)
        far = torch.maximum(t1, t2).amin(-1)
        return torch.where((near <= far) & (near > _T_MIN), near, math.inf)

    def surface(self, points, index):
        cos, sin = torch.cos(self.yaw[index]), torch.sin(self.yaw[index])
        local = self._to_box(points - self.center[index], cos, sin)
        # The face hit is the one the point is relatively closest to.
        axis = (local.abs() / self.half[index]).argmax(-1)
        n_local = F.one_hot(axis, 3).to(local.dtype) * torch.sign(local)
        normal = torch.stack([cos * n_local[:, 0] + sin * n_local[:, 2], n_local[:, 1],
                              -sin * n_local[:, 0] + cos * n_local[:, 2]], -1)
        return normal, local


@dataclass(eq=False)
class Spheres:
    """Spheres. Texture frame: offset from the centre."""

    center: torch.Tensor  # (N,3)
    radius: torch.Tensor  # (N,)
    kind = "sphere"

    def __len__(self):
        return len(self.radius)

    def intersect(self, origins, dirs):
        oc = origins[:, None, :] - self.center
        a = (dirs * dirs).sum(-1, keepdim=True)
        b = (oc * dirs[:, None, :]).sum(-1)
        disc = b * b - a * ((oc * oc).sum(-1) - self.radius**2)
        t = (-b - disc.clamp_min(0).sqrt()) / a
        return torch.where((disc > 0) & (t > _T_MIN), t, math.inf)

    def surface(self, points, index):
        local = points - self.center[index]
        return local / self.radius[index, None], local


@dataclass(eq=False)
class Cylinders:
    """Capped vertical cylinders: axis through ``center`` (x, z used), from ``y0`` to ``y1``.
    Texture frame: offset from the bottom centre."""

    center: torch.Tensor  # (N,3); the y component is ignored
    radius: torch.Tensor  # (N,)
    y0: torch.Tensor  # (N,)
    y1: torch.Tensor  # (N,)
    kind = "cylinder"

    def __len__(self):
        return len(self.radius)

    def intersect(self, origins, dirs):
        ox, oy, oz = (origins[:, None, k] - c for k, c in enumerate((self.center[:, 0], self.y0, self.center[:, 2])))
        dx, dy, dz = dirs[:, None, 0], dirs[:, None, 1], dirs[:, None, 2]
        r2, height = self.radius**2, self.y1 - self.y0
        a = dx * dx + dz * dz
        b = ox * dx + oz * dz
        disc = b * b - a * (ox * ox + oz * oz - r2)
        t_side = (-b - disc.clamp_min(0).sqrt()) / _safe(a)
        y_side = oy + t_side * dy
        t_side = torch.where((disc > 0) & (t_side > _T_MIN) & (y_side >= 0) & (y_side <= height), t_side, math.inf)
        t = t_side
        inv_dy = 1.0 / _safe(dy)
        for level in (0.0, height):
            t_cap = (level - oy) * inv_dy
            px, pz = ox + t_cap * dx, oz + t_cap * dz
            t = torch.where((px * px + pz * pz <= r2) & (t_cap > _T_MIN) & (t_cap < t), t_cap, t)
        return t

    def surface(self, points, index):
        base = torch.stack([self.center[index, 0], self.y0[index], self.center[index, 2]], -1)
        local = points - base
        r = self.radius[index]
        rho = local[:, [0, 2]].norm(dim=-1)
        # Side or cap: whichever surface the point lies closest to.
        on_cap = torch.minimum(local[:, 1].abs(), (local[:, 1] - (self.y1 - self.y0)[index]).abs()) < (rho - r).abs()
        side = torch.stack([local[:, 0], torch.zeros_like(r), local[:, 2]], -1) / r[:, None]
        cap = torch.zeros_like(local)
        cap[:, 1] = 1.0
        return torch.where(on_cap[:, None], cap, side), local


KINDS = ("plane", "box", "sphere", "cylinder")


@dataclass(eq=False)
class Material:
    """Per-primitive texture: kind (plain/checker/stripes/value noise), scale in metres,
    stripe axis, lattice offset and the two colours it blends."""

    kind: torch.Tensor  # (N,) long
    scale: torch.Tensor  # (N,)
    axis: torch.Tensor  # (N,3) unit
    offset: torch.Tensor  # (N,3)
    color_a: torch.Tensor  # (N,3)
    color_b: torch.Tensor  # (N,3)


@dataclass(eq=False)
class Light:
    """Ambient term plus one point light (``position``) or directional sun (``direction``, towards the sun)."""

    ambient: float
    intensity: float
    color: torch.Tensor  # (3,)
    position: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    falloff: float = 0.0  # point light: 1 / (1 + falloff * d^2)


@dataclass(eq=False)
class Scene:
    """Everything one render needs. Primitives are numbered globally in the order
    planes, boxes, spheres, cylinders; ``labels[i]`` is primitive ``i``'s class."""

    flavour: str
    seed: tuple[int, ...]
    camera: Camera
    shapes: tuple  # (Planes, Boxes, Spheres, Cylinders)
    labels: torch.Tensor  # (N,) long
    material: Material
    light: Light
    sky: torch.Tensor | None  # (2,3): horizon and zenith colours; None for closed scenes
    noise_table: torch.Tensor  # (16,16,16) value-noise lattice

    @property
    def classes(self) -> tuple[str, ...]:
        return FLAVOUR_CLASSES[self.flavour]

    @property
    def no_hit_label(self) -> int:
        # A closed room has no escaping ray; if one slips through numerically it is ignored.
        return self.classes.index("sky") if "sky" in self.classes else -1

    def locate(self, index: int) -> tuple[str, int]:
        """(kind, index within that kind's shape) of global primitive ``index``."""
        for shape in self.shapes:
            if index < len(shape):
                return shape.kind, index
            index -= len(shape)
        raise IndexError("primitive index out of range")


@dataclass(eq=False)
class Render:
    """One rendered view. ``normal`` is always computed (street datasets simply do not
    use it) and, like depth, invalid (zero) beyond the sensor range; ``primitive`` is the
    global index of the primitive hit per pixel (-1: none), whatever the range."""

    image: torch.Tensor  # (3,H,W) float32 in [0,1]
    segmentation: torch.Tensor  # (H,W) long
    depth: torch.Tensor  # (1,H,W) float32
    normal: torch.Tensor  # (3,H,W) float32
    primitive: torch.Tensor  # (H,W) long
    scene: Scene


# --------------------------------------------------------------------------- scene generation


def _rng(seed, stream: int) -> np.random.Generator:
    """A generator for one stream of a seed (an int or a tuple of ints). The length is part
    of the entropy so (1, 2) and (1, 2, 0) never share a stream."""
    key = _seed_key(seed)
    return np.random.default_rng([0x5CE7E, len(key), *key, stream])


def is_integer(value) -> bool:
    """``value`` is an integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _seed_key(seed) -> tuple[int, ...]:
    """``seed`` (an int or a sequence of ints) as a tuple of non-negative ints; ``ValueError``
    otherwise. Checked, not int()-ed: that rendered seed 2's scene for 2.5, 1's for True and
    3's for "3"."""
    try:
        key = (seed,) if np.isscalar(seed) else tuple(seed)
    except TypeError:  # neither a number nor a sequence (None, say): refused below
        key = (seed,)
    if not all(is_integer(k) and k >= 0 for k in key):
        raise ValueError(f"seeds must be non-negative integers or tuples of them, got {seed!r}")
    return tuple(int(k) for k in key)


class _Builder:
    """Collects primitives with their class and material, then packs them per kind."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.items: dict[str, list] = {k: [] for k in KINDS}

    def add(self, kind: str, params: tuple, label: int, material: tuple):
        self.items[kind].append((params, label, material))

    def material(self, base, kinds=(PLAIN, CHECKER, STRIPES, VALUE_NOISE), scale=(0.2, 1.0), jitter=0.15,
                 contrast=(0.45, 0.85)):
        """A random material around colour ``base`` (None: any colour)."""
        rng = self.rng
        if base is None:
            color = rng.uniform(0.1, 0.95, 3)
        else:
            color = np.clip(np.asarray(base) * (1 + jitter * rng.standard_normal(3)) + 0.03 * rng.standard_normal(),
                            0.02, 1.0)
        kind = int(rng.choice(kinds))
        # The second colour is usually a darker shade, sometimes another hue.
        if rng.random() < 0.3:
            other = rng.uniform(0.1, 0.95, 3)
        else:
            other = color * rng.uniform(*contrast)
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        return kind, float(rng.uniform(*scale)), axis, rng.uniform(0, 8, 3), color, other

    def build(self):
        def stack(kind, field, shape):
            rows = [params[field] for params, _, _ in self.items[kind]]
            return torch.tensor(np.array(rows, dtype=np.float64).reshape(-1, *shape), dtype=DTYPE)

        shapes = (
            Planes(stack("plane", 0, (3,)), stack("plane", 1, ())),
            Boxes(stack("box", 0, (3,)), stack("box", 1, (3,)), stack("box", 2, ())),
            Spheres(stack("sphere", 0, (3,)), stack("sphere", 1, ())),
            Cylinders(stack("cylinder", 0, (3,)), stack("cylinder", 1, ()), stack("cylinder", 2, ()),
                      stack("cylinder", 3, ())),
        )
        ordered = [item for k in KINDS for item in self.items[k]]
        labels = torch.tensor([label for _, label, _ in ordered], dtype=torch.long)
        mats = [m for _, _, m in ordered]
        material = Material(
            torch.tensor([m[0] for m in mats], dtype=torch.long),
            torch.tensor([m[1] for m in mats], dtype=DTYPE),
            *(torch.tensor(np.array([m[i] for m in mats]), dtype=DTYPE) for i in range(2, 6)),
        )
        return shapes, labels, material


def _place(rng, taken: list, radius: float, x_range, z_range, tries: int = 12):
    """A floor position whose footprint circle avoids those already taken; None when crowded."""
    for _ in range(tries):
        x, z = rng.uniform(*x_range), rng.uniform(*z_range)
        if all((x - tx) ** 2 + (z - tz) ** 2 > (radius + tr) ** 2 for tx, tz, tr in taken):
            taken.append((x, z, radius))
            return x, z
    return None


def _indoor_scene(rng: np.random.Generator, height: int, width: int):
    b = _Builder(rng)
    floor, wall, ceiling, box, sphere, cylinder = range(6)
    room_w, room_l, room_h = rng.uniform(4.0, 7.0), rng.uniform(5.0, 8.0), rng.uniform(2.5, 3.2)
    # The room spans x in [-w/2, w/2], y in [0, h], z in [0, l]; a closed convex room,
    # so its six infinite planes are exactly its surfaces as seen from inside.
    wall_mat = b.material(rng.uniform(0.55, 0.95, 3), kinds=(PLAIN, STRIPES, VALUE_NOISE), scale=(0.15, 0.8),
                          contrast=(0.75, 0.92))
    b.add("plane", ((0.0, 1.0, 0.0), 0.0), floor,
          b.material((0.55, 0.42, 0.3), kinds=(CHECKER, STRIPES, VALUE_NOISE), scale=(0.2, 0.8)))
    b.add("plane", ((0.0, 1.0, 0.0), room_h), ceiling,
          b.material((0.92, 0.92, 0.9), kinds=(PLAIN, VALUE_NOISE), jitter=0.05, contrast=(0.85, 0.95)))
    for normal, offset in (((1.0, 0.0, 0.0), -room_w / 2), ((1.0, 0.0, 0.0), room_w / 2),
                           ((0.0, 0.0, 1.0), 0.0), ((0.0, 0.0, 1.0), room_l)):
        # Walls of one room usually share paint; sometimes one is an accent wall.
        mat = wall_mat if rng.random() < 0.7 else b.material(rng.uniform(0.4, 0.95, 3), scale=(0.15, 0.8))
        b.add("plane", (normal, offset), wall, mat)

    cam_z = rng.uniform(0.3, 1.0)
    camera = Camera.looking(height, width, rng.uniform(55.0, 70.0),
                            (rng.uniform(-room_w / 4, room_w / 4), rng.uniform(1.2, 1.8), cam_z),
                            yaw=rng.uniform(-0.5, 0.5), pitch=rng.uniform(-0.45, -0.05))
    taken = [(camera.position[0].item(), cam_z, 0.6)]
    xs, zs = (-room_w / 2 + 0.2, room_w / 2 - 0.2), (cam_z + 1.0, room_l - 0.2)
    tops = []
    for _ in range(rng.integers(2, 6)):
        half = (rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.8))
        spot = _place(rng, taken, math.hypot(half[0], half[2]), xs, zs)
        if spot is None:
            continue
        yaw = 0.0 if rng.random() < 0.5 else rng.uniform(0, math.pi / 2)
        b.add("box", ((spot[0], half[1], spot[1]), half, yaw), box, b.material(None))
        tops.append((spot[0], 2 * half[1], spot[1], min(half[0], half[2])))
    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(0.15, 0.45)
        if tops and rng.random() < 0.4:  # a ball resting on a piece of furniture
            x, top, z, _ = tops.pop(rng.integers(len(tops)))
            center = (x, top + r, z)
        else:
            spot = _place(rng, taken, r, xs, zs)
            if spot is None:
                continue
            center = (spot[0], r, spot[1])
        b.add("sphere", (center, r), sphere, b.material(None, scale=(0.08, 0.3)))
    for _ in range(rng.integers(1, 4)):
        r = rng.uniform(0.08, 0.35)
        spot = _place(rng, taken, r, xs, zs)
        if spot is None:
            continue
        b.add("cylinder", ((spot[0], 0.0, spot[1]), r, 0.0, rng.uniform(0.3, room_h - 0.1)), cylinder,
              b.material(None, scale=(0.08, 0.4)))

    light = Light(
        ambient=rng.uniform(0.12, 0.35),
        intensity=rng.uniform(0.8, 1.6),
        color=torch.tensor(1.0 + 0.08 * rng.standard_normal(3), dtype=DTYPE).clamp(0.8, 1.2),
        position=torch.tensor([rng.uniform(-room_w / 3, room_w / 3), room_h - rng.uniform(0.2, 0.5),
                               rng.uniform(0.2 * room_l, 0.8 * room_l)], dtype=DTYPE),
        falloff=rng.uniform(0.02, 0.08),
    )
    return b, camera, light, None


def _street_scene(rng: np.random.Generator, height: int, width: int):
    b = _Builder(rng)
    road, sidewalk, building, car, pole, vegetation = range(6)
    road_half, walk = rng.uniform(3.5, 6.0), rng.uniform(2.0, 4.0)
    b.add("plane", ((0.0, 1.0, 0.0), 0.0), road,
          b.material((0.27, 0.27, 0.28), kinds=(PLAIN, VALUE_NOISE), scale=(0.1, 0.5), contrast=(0.7, 0.9)))
    # Sidewalks are raised slabs (a real curb): they extend under the buildings.
    curb = rng.uniform(0.1, 0.2)
    walk_mat = b.material((0.6, 0.58, 0.55), kinds=(PLAIN, CHECKER, VALUE_NOISE), scale=(0.3, 1.0),
                          contrast=(0.75, 0.9))
    for side in (-1.0, 1.0):
        b.add("box", ((side * (road_half + 30.0), curb / 2, 90.0), (30.0, curb / 2, 120.0), 0.0), sidewalk, walk_mat)
    facades = [(0.75, 0.65, 0.5), (0.6, 0.3, 0.25), (0.7, 0.7, 0.72), (0.85, 0.8, 0.7), (0.45, 0.45, 0.5)]
    for side in (-1.0, 1.0):
        z = rng.uniform(-15.0, -5.0)
        while z < 110.0:
            if rng.random() < 0.25:
                z += rng.uniform(2.0, 8.0)  # an alley
            along, tall, deep = rng.uniform(6.0, 20.0), rng.uniform(6.0, 28.0), rng.uniform(8.0, 16.0)
            setback = road_half + walk + rng.uniform(0.0, 1.5)
            b.add("box", ((side * (setback + deep / 2), tall / 2, z + along / 2), (deep / 2, tall / 2, along / 2), 0.0),
                  building, b.material(facades[rng.integers(len(facades))], kinds=(PLAIN, CHECKER, STRIPES),
                                       scale=(0.8, 2.5)))
            z += along
    for _ in range(rng.integers(1, 7)):
        side = rng.choice((-1.0, 1.0))
        if rng.random() < 0.5:  # parked at the curb
            x, yaw = side * (road_half - 1.1), rng.uniform(-0.03, 0.03)
        else:
            x, yaw = side * rng.uniform(0.9, max(1.0, road_half - 1.2)), rng.uniform(-0.12, 0.12)
        z = rng.uniform(5.0, 55.0)
        mat = b.material(None, kinds=(PLAIN, PLAIN, VALUE_NOISE), scale=(0.5, 1.5), contrast=(0.6, 0.9))
        body_h, cabin_h = rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.4)
        b.add("box", ((x, 0.2 + body_h, z), (0.9, body_h, 2.1), yaw), car, mat)
        shift = rng.uniform(-0.5, 0.2)  # cabin position along the car, rotated with it
        b.add("box", ((x + shift * math.sin(yaw), 0.2 + 2 * body_h + cabin_h, z + shift * math.cos(yaw)),
                      (0.8, cabin_h, rng.uniform(0.8, 1.2)), yaw), car, mat)
    for _ in range(rng.integers(2, 7)):
        side = rng.choice((-1.0, 1.0))
        b.add("cylinder", ((side * (road_half + rng.uniform(0.3, 0.8)), 0.0, rng.uniform(4.0, 70.0)),
                           rng.uniform(0.07, 0.15), 0.0, rng.uniform(3.5, 8.0)), pole,
              b.material((0.35, 0.35, 0.38), kinds=(PLAIN, STRIPES), scale=(0.3, 1.0)))
    for _ in range(rng.integers(0, 5)):
        side = rng.choice((-1.0, 1.0))
        x, z, trunk = side * (road_half + walk * rng.uniform(0.4, 0.8)), rng.uniform(5.0, 70.0), rng.uniform(2.0, 3.5)
        crown = rng.uniform(1.0, 2.2)
        b.add("cylinder", ((x, 0.0, z), rng.uniform(0.12, 0.25), 0.0, trunk), vegetation,
              b.material((0.35, 0.25, 0.15), kinds=(PLAIN, VALUE_NOISE), scale=(0.1, 0.3)))
        b.add("sphere", ((x, trunk + 0.7 * crown, z), crown), vegetation,
              b.material((0.25, 0.5, 0.2), kinds=(VALUE_NOISE,), scale=(0.15, 0.4), contrast=(0.4, 0.7)))

    camera = Camera.looking(height, width, rng.uniform(60.0, 80.0),
                            (rng.uniform(-road_half + 1.5, road_half - 1.5), rng.uniform(1.3, 1.8), 0.0),
                            yaw=rng.uniform(-0.15, 0.15), pitch=rng.uniform(-0.12, 0.03))
    elevation, azimuth = rng.uniform(0.3, 1.2), rng.uniform(0.0, 2 * math.pi)
    light = Light(
        ambient=rng.uniform(0.2, 0.45),
        intensity=rng.uniform(0.7, 1.3),
        color=torch.tensor(1.0 + 0.08 * rng.standard_normal(3), dtype=DTYPE).clamp(0.8, 1.2),
        direction=torch.tensor([math.cos(elevation) * math.sin(azimuth), math.sin(elevation),
                                math.cos(elevation) * math.cos(azimuth)], dtype=DTYPE),
    )
    horizon = np.clip(np.array([0.78, 0.83, 0.9]) + 0.05 * rng.standard_normal(3), 0, 1)
    zenith = np.clip(np.array([0.35, 0.55, 0.85]) + 0.08 * rng.standard_normal(3), 0, 1)
    return b, camera, light, torch.tensor(np.stack([horizon, zenith]), dtype=DTYPE)


_GENERATORS = {"indoor": _indoor_scene, "street": _street_scene}


def check_image_size(height, width) -> None:
    """``ValueError`` unless ``height`` and ``width`` are integers of at least 2 (not bools:
    True is no size, and 2.5 rows would fail later in a reshape)."""
    if not (is_integer(height) and is_integer(width)) or height < 2 or width < 2:
        raise ValueError(f"image size must be integers of at least 2x2, got {height!r}x{width!r}")


def make_scene(flavour: str, seed, height: int = 48, width: int = 64) -> Scene:
    """The scene of ``flavour`` for ``seed`` (an int or a tuple of non-negative ints)."""
    if flavour not in _GENERATORS:
        raise ValueError(f"unknown scene flavour {flavour!r}; known: {sorted(_GENERATORS)}")
    check_image_size(height, width)
    rng = _rng(seed, 0)
    builder, camera, light, sky = _GENERATORS[flavour](rng, height, width)
    shapes, labels, material = builder.build()
    table = torch.tensor(rng.random((_NOISE_TABLE,) * 3), dtype=DTYPE)
    return Scene(flavour, _seed_key(seed), camera, shapes, labels, material, light, sky, table)


# --------------------------------------------------------------------------- tracing and shading


def trace(scene: Scene, origins: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest hit per ray: t (P,) (inf: none) and the global primitive index (P,).
    ``origins`` is (P,3) or (1,3) when all rays share one."""
    ts, indices = [], []
    for start in range(0, len(dirs), _RAY_CHUNK):
        d = dirs[start : start + _RAY_CHUNK]
        o = origins if len(origins) == 1 else origins[start : start + _RAY_CHUNK]
        t_all = torch.cat([shape.intersect(o, d) for shape in scene.shapes if len(shape)], 1)
        t, index = t_all.min(1)
        ts.append(t)
        indices.append(index)
    return torch.cat(ts), torch.cat(indices)


def surface(scene: Scene, points: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World normals (unoriented) and texture-frame points (M,3) of hit ``points`` (M,3)
    on global primitives ``index`` (M,)."""
    normal, local = torch.zeros_like(points), torch.zeros_like(points)
    start = 0
    for shape in scene.shapes:
        mine = ((index >= start) & (index < start + len(shape))).nonzero().squeeze(1)
        if len(mine):
            normal[mine], local[mine] = shape.surface(points[mine], index[mine] - start)
        start += len(shape)
    return normal, local


def _occluded(scene: Scene, origins: torch.Tensor, dirs: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Whether anything lies on each ray before ``limit`` (shadow rays)."""
    if len(dirs) == 0:
        return torch.zeros(0, dtype=torch.bool)
    return trace(scene, origins, dirs)[0] < limit


def _value_noise(table: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Trilinear value noise in [0, 1] on a periodic lattice, smoothstep-interpolated."""
    base = torch.floor(q)
    f = q - base
    f = f * f * (3 - 2 * f)
    i = base.long() % _NOISE_TABLE
    out = torch.zeros(len(q), dtype=DTYPE)
    for corner in range(8):
        bits = [(corner >> k) & 1 for k in range(3)]
        idx = [(i[:, k] + bits[k]) % _NOISE_TABLE for k in range(3)]
        w = torch.ones(len(q), dtype=DTYPE)
        for k in range(3):
            w = w * (f[:, k] if bits[k] else 1 - f[:, k])
        out = out + w * table[idx[0], idx[1], idx[2]]
    return out


def _texture(scene: Scene, index: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Albedo (P,3) of the hit points from their primitive's material."""
    m = scene.material
    q = local / m.scale[index, None] + m.offset[index]
    kind = m.kind[index]
    checker = (torch.floor(q).sum(-1) % 2).abs()
    stripes = (0.5 + 2.0 * torch.sin(2 * math.pi * (q * m.axis[index]).sum(-1))).clamp(0, 1)
    blend = torch.where(kind == CHECKER, checker, torch.where(kind == STRIPES, stripes, 0.0))
    noisy = (kind == VALUE_NOISE).nonzero().squeeze(1)  # the costliest texture: only where used
    if len(noisy):
        qn = q[noisy]
        blend[noisy] = 0.65 * _value_noise(scene.noise_table, qn) + 0.35 * _value_noise(scene.noise_table, 2.7 * qn + 5.0)
    return m.color_a[index] * (1 - blend[:, None]) + m.color_b[index] * blend[:, None]


def _geometry(scene: Scene):
    """Per-pixel clean geometry and shading of a scene."""
    cam = scene.camera
    rays_cam = cam.rays()
    dirs = rays_cam @ cam.rotation.T
    origin = cam.position[None]
    t, index = trace(scene, origin, dirs)
    hit = torch.isfinite(t)
    idx = hit.nonzero().squeeze(1)
    p = origin + t[idx, None] * dirs[idx]
    n, local = surface(scene, p, index[idx])
    # Orient normals towards the camera (a plane's stored normal has an arbitrary sign).
    n = torch.where(((n * dirs[idx]).sum(-1) > 0)[:, None], -n, n)
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    normal = torch.zeros_like(dirs)
    normal[idx] = n

    light = scene.light
    color = torch.zeros(len(dirs), 3, dtype=DTYPE)
    if len(idx):
        if light.position is not None:
            to_light = light.position - p
            dist = to_light.norm(dim=-1)
            l_dir = to_light / dist[:, None]
            atten = 1.0 / (1.0 + light.falloff * dist**2)
        else:
            l_dir = light.direction.expand_as(p)
            dist = torch.full((len(p),), math.inf, dtype=DTYPE)
            atten = torch.ones(len(p), dtype=DTYPE)
        lambert = (n * l_dir).sum(-1).clamp_min(0)
        lit = (lambert > 0).nonzero().squeeze(1)
        visible = torch.zeros(len(p), dtype=DTYPE)
        visible[lit] = (~_occluded(scene, p[lit] + _SHADOW_BIAS * n[lit], l_dir[lit], dist[lit])).to(DTYPE)
        albedo = _texture(scene, index[idx], local)
        shade = light.ambient + light.intensity * lambert * visible * atten
        color[idx] = albedo * shade[:, None] * light.color
    if scene.sky is not None:
        sky = (~hit).nonzero().squeeze(1)
        up = (dirs[sky, 1] / dirs[sky].norm(dim=-1)).clamp(0, 1).sqrt()[:, None]
        color[sky] = scene.sky[0] * (1 - up) + scene.sky[1] * up
    image = color.clamp(0, 1) ** (1 / 2.2)

    labels = torch.where(hit, scene.labels[index.clamp(max=len(scene.labels) - 1)], scene.no_hit_label)
    valid_depth = hit & (t <= MAX_DEPTH[scene.flavour])
    depth = torch.where(valid_depth, t, 0.0)
    # Real normal maps are derived from the depth sensor: no depth, no normal.
    normal_cam = torch.where(valid_depth[:, None], cam.direction_to_camera_frame(normal), 0.0)
    primitive = torch.where(hit, index, -1)
    h, w = cam.height, cam.width
    return (image.T.reshape(3, h, w), labels.reshape(h, w), depth.reshape(1, h, w),
            normal_cam.T.reshape(3, h, w), primitive.reshape(h, w))


def _smooth_field(rng: np.random.Generator, channels: int, height: int, width: int, cells: int = 4) -> torch.Tensor:
    """Unit-scale smooth Gaussian noise (C,H,W): a coarse grid upsampled bicubically."""
    gh, gw = cells + 1, max(2, round(cells * width / height)) + 1
    grid = torch.tensor(rng.standard_normal((1, channels, gh, gw)), dtype=DTYPE)
    return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)[0]


def _add_noise(rng, noise: NoiseOptions, image, labels, depth, normal):
    """Sensor and annotation noise; every field is drawn even when its option is 0."""
    _, h, w = image.shape
    depth_field = _smooth_field(rng, 1, h, w)
    dropout = torch.tensor(rng.random((1, h, w)), dtype=DTYPE) < noise.depth_dropout
    normal_field = _smooth_field(rng, 3, h, w, cells=6)
    direction = torch.tensor(rng.integers(0, 4, (h, w)), dtype=torch.long)
    flip_u = torch.tensor(rng.random((h, w)), dtype=DTYPE)
    ignore_u = torch.tensor(rng.random((h, w)), dtype=DTYPE)
    image_noise = torch.tensor(rng.standard_normal((3, h, w)), dtype=DTYPE)

    valid = depth > 0
    depth = torch.where(valid, depth * (1 + noise.depth_sigma * depth_field).clamp_min(0.5), 0.0)
    depth = torch.where(dropout, 0.0, depth)

    has_normal = normal.abs().sum(0, keepdim=True) > 0
    if noise.normal_sigma > 0:
        perturbed = F.normalize(normal + noise.normal_sigma * normal_field, dim=0)
        normal = torch.where(has_normal, perturbed, 0.0)
    normal = torch.where(dropout, 0.0, normal)

    # Boundary pixels: where a 4-neighbour has another class (edges replicate).
    padded = F.pad(labels[None, None].double(), (1, 1, 1, 1), mode="replicate")[0, 0].long()
    neighbours = torch.stack([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
    boundary = (neighbours != labels).any(0)
    neighbour = neighbours.gather(0, direction[None]).squeeze(0)
    labels = torch.where(boundary & (flip_u < noise.label_flip), neighbour, labels)
    labels = torch.where(boundary & (ignore_u < noise.label_ignore), -1, labels)

    image = (image + noise.image_sigma * image_noise).clamp(0, 1)
    return image, labels, depth, normal


def render(scene: Scene, noise: NoiseOptions | None = None) -> Render:
    """Render ``scene``; ``noise=None`` gives the clean geometry (no sensor or label noise)."""
    image, labels, depth, normal, primitive = _geometry(scene)
    if noise is not None:
        image, labels, depth, normal = _add_noise(_rng(scene.seed, 1), noise, image, labels, depth, normal)
    return Render(image.float(), labels, depth.float(), normal.float(), primitive, scene)


def render_scene(flavour: str, seed, height: int = 48, width: int = 64,
                 noise: NoiseOptions | None = NoiseOptions()) -> Render:
    """Make and render the scene of ``flavour`` for ``seed``; default noise on, ``noise=None`` clean."""
    return render(make_scene(flavour, seed, height, width), noise)


# With ``workers="auto"``, below this many pixels (scenes x height x width) a render stays in
# this process: starting workers costs seconds. The ``full`` suite's indoor splits (1,449
# scenes at 288x384, ~2.3 min in one process) are far above it, the smoke suite's far below.
PARALLEL_PIXELS = 20_000_000


def render_workers(n_scenes: int, height: int, width: int) -> int:
    """How many processes ``render_batch(workers="auto")`` uses: 1 for small renders, else
    the CPUs this process may run on (at most one per 8 scenes)."""
    if n_scenes * height * width < PARALLEL_PIXELS:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_scenes // 8))


def _render_serial(flavour: str, seeds: Sequence, height: int, width: int,
                   noise: NoiseOptions | None) -> dict[str, torch.Tensor]:
    keys = ("image",) + FLAVOUR_TASKS[flavour]
    out: dict[str, list] = {k: [] for k in keys}
    for seed in seeds:
        r = render_scene(flavour, seed, height, width, noise)
        for k in keys:
            out[k].append(getattr(r, k))
    return {k: torch.stack(v) for k, v in out.items()}


def _render_chunk(args) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)  # one process per core already
    return _render_serial(*args)


def render_batch(flavour: str, seeds: Sequence, height: int = 48, width: int = 64,
                 noise: NoiseOptions | None = NoiseOptions(), workers: int | str = 1) -> dict[str, torch.Tensor]:
    """Stacked renders of many seeds: ``image`` (B,3,H,W) and one target per task of the
    flavour (``segmentation`` (B,H,W), ``depth`` (B,1,H,W), ``normal`` (B,3,H,W)).

    ``workers`` > 1 processes (``"auto"``: :func:`render_workers`) render contiguous
    chunks of ``seeds``. Every scene depends on its seed alone, so the tensors are the
    same for any number of workers. The workers are spawned, so a script that asks for
    them needs the ``if __name__ == "__main__":`` guard, and a daemonic process (a
    Celery prefork child) cannot use them; the default, 1, renders in this process."""
    if flavour not in FLAVOUR_TASKS:
        raise ValueError(f"unknown scene flavour {flavour!r}; known: {sorted(FLAVOUR_TASKS)}")
    check_image_size(height, width)  # here too: no scene may be made to check it
    if workers != "auto" and not (is_integer(workers) and workers >= 1):
        raise ValueError(f"workers must be a positive integer or 'auto', got {workers!r}")
    keys = ("image",) + FLAVOUR_TASKS[flavour]
    seeds = list(seeds)  # a generator too
    if not seeds:
        shapes = {"image": (3, height, width), "segmentation": (height, width), "depth": (1, height, width),
                  "normal": (3, height, width)}
        return {k: torch.zeros((0, *shapes[k]), dtype=torch.long if k == "segmentation" else torch.float32)
                for k in keys}
    workers = render_workers(len(seeds), height, width) if workers == "auto" else int(workers)
    if workers == 1 or len(seeds) < 2:
        return _render_serial(flavour, seeds, height, width, noise)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = [round(i * len(seeds) / workers) for i in range(workers + 1)]
    chunks = [(flavour, seeds[a:b], height, width, noise) for a, b in zip(bounds, bounds[1:]) if b > a]
    # spawn: a forked child would inherit torch's thread pools (and CUDA, when initialised)
    with ProcessPoolExecutor(max_workers=len(chunks), mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_render_chunk, chunks))
    return {k: torch.cat([part[k] for part in parts]) for k in keys}
