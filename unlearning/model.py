"""The multi-task network: a shared convolutional encoder and one decoder head per task.

Hard parameter sharing, plain torch (no torchvision). GroupNorm rather than
BatchNorm: running statistics would leak the forgotten data and couple
instances outside the gradient path. Checkpoints are safetensors plus a JSON
config; nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .jsonio import loads_strict
from .tasks import get_task

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ModelConfig:
    """Architecture: the tasks with their output channels, encoder width and depth."""

    tasks: dict[str, int]
    in_channels: int = 3
    width: int = 32
    depth: int = 3
    head_width: int = 32

    @classmethod
    def for_dataset(cls, dataset, width: int = 32, depth: int = 3, head_width: int = 32) -> "ModelConfig":
        tasks = {t: get_task(t).out_channels(dataset.num_classes) for t in dataset.tasks}
        return cls(tasks=tasks, width=width, depth=depth, head_width=head_width)


def _groups(channels: int) -> int:
    """GroupNorm's group count for ``channels``: 8 where it divides them, as every width
    a multiple of 8 always had; else the largest divisor of 8 that does (``min(8, c)``
    failed for widths such as 12 or 20, inside torch, after every check had passed).
    The groups hold no parameters, so checkpoints of any width load as before."""
    return channels if channels < 8 else math.gcd(8, channels)


class ImageSizeError(ValueError):
    """Images too small for the model's GroupNorm layers one at a time (:func:`check_image_size`)."""


def check_image_size(cfg: ModelConfig, height: int, width: int) -> None:
    """:class:`ImageSizeError` (a ``ValueError``) when one ``height`` x ``width`` image
    would leave a GroupNorm group of ``cfg``'s model a single value: the feature map has shrunk to 1x1 where a group holds
    one channel (widths under 16 at the encoder's last stage, or a head width of 8 or less).
    torch refuses to normalise that ("Expected more than 1 value per channel"), in eval
    mode too, so the model trained on batches and failed on the first single image."""
    h, w = int(height), int(width)
    maps = []
    for d in range(cfg.depth):
        if d:
            h, w = (h + 1) // 2, (w + 1) // 2  # a 3x3 convolution of stride 2, padding 1
        maps.append((f"encoder stage {d + 1}", cfg.width * 2 ** d, h, w))
    maps.append(("heads' first block", cfg.head_width, h, w))  # it runs on the encoder's output
    for where, channels, mh, mw in maps:
        if mh * mw * (channels // _groups(channels)) == 1:
            raise ImageSizeError(
                f"{height}x{width} images shrink to 1x1 at the model's {where}, where each GroupNorm group of its "
                f"{channels} channels holds one channel: a single image cannot be normalised there. Use larger "
                f"images, a smaller depth (now {cfg.depth}) or widths of at least 16 (now {cfg.width} and head "
                f"width {cfg.head_width})")


def parameter_count(cfg: ModelConfig) -> int:
    """The number of parameters of ``MultiTaskNet(cfg)``, counted without building it (as
    Python integers: a width or depth far past what torch can allocate is counted too)."""
    def block(cin: int, cout: int) -> int:  # _block: a 3x3 convolution without bias, GroupNorm's affine
        return 9 * cin * cout + 2 * cout

    total, cin = 0, cfg.in_channels
    for d in range(cfg.depth):
        cout = cfg.width * 2 ** d
        total += block(cin, cout) + block(cout, cout)
        cin = cout
    for channels in cfg.tasks.values():  # Head: conv, refine, a 1x1 output convolution with bias
        total += block(cin, cfg.head_width) + block(cfg.head_width, cfg.head_width)
        total += cfg.head_width * channels + channels
    return total


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(_groups(cout), cout),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """``depth`` stages; each halves the resolution (but the first) and doubles the width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        stages = []
        cin = cfg.in_channels
        for d in range(cfg.depth):
            cout = cfg.width * 2 ** d
            stages.append(nn.Sequential(_block(cin, cout, 1 if d == 0 else 2), _block(cout, cout, 1)))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.out_channels = cin

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return x


class Head(nn.Module):
    def __init__(self, cin: int, width: int, cout: int):
        super().__init__()
        self.conv = _block(cin, width, 1)
        self.refine = _block(width, width, 1)
        self.out = nn.Conv2d(width, cout, 1)

    def forward(self, z, size):
        x = self.conv(z)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.out(self.refine(x))


class MultiTaskNet(nn.Module):
    """Shared encoder + per-task heads. ``forward`` returns activated predictions per task."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.heads = nn.ModuleDict(
            {t: Head(self.encoder.out_channels, cfg.head_width, c) for t, c in cfg.tasks.items()}
        )

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    def forward(self, x: torch.Tensor, tasks=None) -> dict[str, torch.Tensor]:
        z = self.encoder(x)
        return self.decode(z, x.shape[-2:], tasks)

    def decode(self, z, size, tasks=None) -> dict[str, torch.Tensor]:
        tasks = self.tasks if tasks is None else tasks
        return {t: get_task(t).activate(self.heads[t](z, size)) for t in tasks}

    def shared_parameters(self):
        return list(self.encoder.parameters())

    def head_parameters(self, task: str):
        return list(self.heads[task].parameters())


def saved_state(model: MultiTaskNet) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_model` writes: the state, detached, contiguous, on the host."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model(model: MultiTaskNet, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    save_file(saved_state(model), str(weights))
    (directory / CONFIG_FILE).write_text(json.dumps({"model": asdict(model.config), **(extra or {})}, indent=2))
    return weights


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> MultiTaskNet:
    """Load a checkpoint written by :func:`save_model`. ``FileNotFoundError`` when a file
    is missing; ``ValueError`` naming the file for everything else that is wrong with it:
    a config that is not JSON or lacks a valid ``model`` section, weights that are not a
    safetensors file, weights that do not match the configuration (mismatched checkpoint)."""
    from .train import resolve_device

    resolve_device(map_location)  # a device this machine lacks, named before the files are read
    directory = Path(directory)
    config = read_model_config(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no weights file {weights}")
    return model_from_safetensors(config, weights.read_bytes(), weights, map_location)


def model_from_safetensors(config: "ModelConfig", data: bytes, source: str | Path,
                           map_location: str | torch.device = "cpu") -> MultiTaskNet:
    """The model of ``config`` with the weights in ``data`` (the bytes of a safetensors file,
    e.g. those just hashed); ``ValueError`` naming ``source`` when they are not a
    safetensors file or do not match the configuration. ``map_location`` as
    :func:`unlearning.train.resolve_device` takes it (a RuntimeError naming a device this
    machine lacks, where torch asserted "Torch not compiled with CUDA enabled")."""
    from .train import resolve_device  # the training module imports this one

    device = resolve_device(map_location)
    state = fitting_state(config, data, source)
    model = MultiTaskNet(config)
    model.load_state_dict(state)  # checked above (load_state would scan the weights again)
    return model.to(device)


def fitting_state(config: "ModelConfig", data: bytes, source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors bytes ``data``, checked to fit the model of ``config``
    (:func:`check_state`) without building it: ``ValueError`` naming ``source`` otherwise."""
    try:
        state = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{source} is not a readable safetensors file: {exc}") from None
    # the weights are compared with a model without storage: a config naming a huge
    # width would otherwise allocate (and randomly initialise) it before the comparison
    try:
        with torch.device("meta"):
            own = MultiTaskNet(config).state_dict()
    except (RuntimeError, TypeError, OverflowError) as exc:  # sizes past what torch can count (depth 64, width 2**62)
        raise ValueError(f"{source}: the model configuration cannot be built ({exc})") from None
    check_state(own, state, source)
    return state


def non_finite_tensors(state: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype] | None = None) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold a NaN or an infinity
    (one read-back for all of them); with ``dtypes`` (name -> the dtype a tensor is loaded
    as), judged in that dtype: a float64 1e300 is finite, and infinite once a float32
    model holds it."""
    tensors = [(n, t) for n, t in state.items() if t.is_floating_point()]
    if not tensors:
        return []

    def as_loaded(name: str, t: torch.Tensor) -> torch.Tensor:
        target = (dtypes or {}).get(name, t.dtype)
        if t.dtype != target:
            return t.to(target)
        # isfinite has no kernel for the float8 types: their values are floats' values
        return t.float() if t.element_size() == 1 else t

    finite = torch.stack([torch.isfinite(as_loaded(n, t)).all() for n, t in tensors]).tolist()
    return [n for (n, _), ok in zip(tensors, finite) if not ok]


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str | Path = "checkpoint") -> None:
    """``ValueError`` naming ``source`` (the weights file, where there is one) and what of the
    weights ``state`` does not fit a model whose own state is ``own``: missing, unexpected or
    mis-shaped tensors, tensors that are not floating point, non-finite values."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} for {tuple(own[k].shape)}"
              for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match the model configuration: "
            f"missing={missing[:5]} unexpected={unexpected[:5]} wrong shapes={shapes[:5]}"
        )
    dtypes = [f"{k} ({state[k].dtype})" for k in own if own[k].is_floating_point() and not state[k].is_floating_point()]
    if dtypes:
        raise ValueError(f"{source}: weights must be floating point, got {', '.join(dtypes[:5])}")
    bad = non_finite_tensors(state, {k: own[k].dtype for k in own if own[k].is_floating_point()})
    if bad:
        raise ValueError(f"{source}: non-finite weights (NaN or infinity) in {', '.join(bad[:5])}")


def read_model_config(path: str | Path) -> ModelConfig:
    """The ``model`` section of a checkpoint's ``config.json``, checked field by field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint config {path}")
    try:
        doc = loads_strict(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, RepeatedName
        raise ValueError(f"{path} is not JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path} is not a checkpoint config: JSON nested too deep") from None
    return model_config_from(doc, path)


def model_config_from(doc, path: str | Path) -> ModelConfig:
    """The ``model`` section of the parsed ``config.json`` ``doc`` (read from ``path``,
    which the errors name), checked field by field."""
    cfg = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} has no 'model' section (the architecture save_model writes)")
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(cfg) - known)
    if unknown or "tasks" not in cfg:
        raise ValueError(f"{path}: 'model' has unknown fields {unknown} or lacks 'tasks'; fields: {sorted(known)}")
    tasks = cfg["tasks"]
    if not isinstance(tasks, dict) or not tasks or not all(
            isinstance(t, str) and type(c) is int and c > 0 for t, c in tasks.items()):
        raise ValueError(f"{path}: 'model.tasks' must map task names to positive channel counts, got {tasks!r}")
    for task in tasks:
        try:
            get_task(task)
        except KeyError as exc:
            raise ValueError(f"{path}: {exc.args[0]}") from None
    for name in known - {"tasks"}:
        if name in cfg and not (type(cfg[name]) is int and cfg[name] > 0):
            raise ValueError(f"{path}: 'model.{name}' must be a positive integer, got {cfg[name]!r}")
    return ModelConfig(**cfg)


def load_state(model: MultiTaskNet, state: dict[str, torch.Tensor]) -> None:
    """Strictly load ``state`` into ``model`` (see :func:`check_state` for what is refused)."""
    check_state(model.state_dict(), state)
    model.load_state_dict(state)


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """A digest of the model's state (every tensor's name, dtype, shape and bytes, in order):
    equal for a model and its working copy on another device, different for any other
    weights. It costs a copy to the host and the hash: about 6 ms for a width-32 depth-3
    model (0.4 M parameters) on one CPU core. What the methods cache per model version
    (``UnlearnData.cache``) is keyed by it too: a cache handed to another model's job is
    never read as that model's."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
