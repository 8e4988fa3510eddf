"""What the command-line entry points share (``unlearnd train``: :mod:`unlearning.train`,
``unlearnd unlearn``: :mod:`unlearning.unlearn`, ``unlearnd bench``: :mod:`unlearning.bench`):
a request a command refuses is one line ``error: <what is wrong>`` on stderr and exit
status 2, no traceback, and nothing written."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import torch

from .jsonio import RepeatedName, loads_strict

USER_ERROR = 2  # the exit status of a refused request (argparse's for a usage error)
INTERRUPTED = 130  # the exit status of a run cut off by Ctrl-C (128 + SIGINT, as a shell reports it)

# The seeds torch.manual_seed and torch.Generator.manual_seed take (negative ones too): any
# other integer is "Overflow when unpacking long long", raised from inside the work.
TORCH_SEEDS = range(-(2**63), 2**64)
# A method's seed ``s`` (``unlearnd unlearn --seed``, ``unlearnd bench --seeds``) seeds its
# generators with ``s * 1_000_003 + salt``, salt <= 11 (unlearning.methods.loops,
# interference_aware): the seeds for which every one of those is a torch seed.
METHOD_SEEDS = range(-(2**63 // 1_000_003), (2**64 - 1 - 11) // 1_000_003 + 1)
# interference_aware's ``shadow_seed`` ``s`` seeds the split of the calibration's folds with
# ``7_919 + s`` (interference_aware.shadow_folds): the seeds for which that is a torch seed.
SHADOW_SEEDS = range(TORCH_SEEDS.start - 7_919, TORCH_SEEDS.stop - 7_919)


class CliError(ValueError):
    """A request a command-line entry point refuses before it writes anything (the
    message names what is wrong); :func:`report_cli_error` reports it."""


def report_cli_error(exc: BaseException | str) -> int:
    """Print ``error: <message>`` on stderr; returns the exit status of a refused request (2)."""
    print(f"error: {exc}", file=sys.stderr)
    return USER_ERROR


def check_seed(value: int, option: str, seeds: range = TORCH_SEEDS) -> int:
    """``value`` when it is in ``seeds``; :class:`CliError` naming ``option`` otherwise (before
    any work: torch would refuse it only once the data is loaded)."""
    if value not in seeds:
        raise CliError(f"{option} {value} is out of range: a seed is an integer from {seeds.start} to {seeds[-1]}")
    return value


class Writes:
    """How far a command got with its output, for the message of a Ctrl-C
    (:func:`report_interrupted`): :func:`write_dir_atomically` given one records its
    ``out`` and ``state``: ``"nothing"`` before the write, ``"writing"`` during it,
    ``"written"`` once ``out`` is in place and the write is over."""

    def __init__(self) -> None:
        self.out: Path | None = None
        self.state = "nothing"


def report_interrupted(writes: Writes) -> int:
    """One line on stderr for a run cut off by Ctrl-C, saying what was written (nothing, unless
    the write had begun: it is atomic); returns the exit status (130)."""
    out = writes.out
    if writes.state == "written":
        message = f"interrupted: {out} was written in full"
    elif writes.state == "writing":
        message = (f"interrupted while writing {out}: it holds what it held before or the whole new output, "
                   f"never a part of it (a hidden .{out.name}.*.tmp or .old folder may be left beside it)")
    else:
        message = "interrupted: nothing was written"
    print(message, file=sys.stderr)
    return INTERRUPTED


def cli_device(value: str | None, option: str = "--device") -> torch.device:
    """:func:`resolve_device` of a command-line value (``auto`` or None, ``cpu``, ``cuda[:n]``);
    :class:`CliError` for anything else, or a CUDA device this machine does not have."""
    from .train import resolve_device  # (the training module imports this one)

    if value not in (None, "auto"):
        try:
            kind = torch.device(value).type
        except (RuntimeError, TypeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise CliError(f"{option} {value!r} is not a device: use auto, cpu or cuda[:n]")
    try:
        device = resolve_device(value)
    except RuntimeError as exc:
        raise CliError(f"{option}: {exc}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"{option} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def json_type(value: Any) -> str:
    """What JSON calls the type of a parsed ``value`` (for messages)."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: Any) -> bool:
    """``value`` is a sha256 as checkpoints record one: 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def short_repr(value: Any, limit: int = 60) -> str:
    """A bounded ``repr`` for a message, of a value that may be a whole table (an int too
    large for ``repr`` by its size)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits()
        return f"<an int of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[:limit] + "…"


def read_json(path: str | Path, what: str = "") -> Any:
    """The JSON document in the file ``path``; :class:`CliError` when it is missing or not a
    file, unreadable, not UTF-8 text, not JSON, or nested too deeply to parse. ``what``
    (an option, e.g. ``--merge``) prefixes the path in the messages."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if not path.exists():
        raise CliError(f"{name} does not exist")
    if not path.is_file():
        raise CliError(f"{name} is not a file")
    try:
        return loads_strict(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CliError(f"{name} is not JSON: it is not UTF-8 text") from None
    except (json.JSONDecodeError, RepeatedName) as exc:
        raise CliError(f"{name} is not JSON: {exc}") from None
    except RecursionError:
        raise CliError(f"{name} is nested too deeply to parse") from None
    except OSError as exc:
        raise CliError(f"cannot read {name}: {exc.strerror or exc}") from None


def _name_max(directory: Path) -> int:
    """The longest file name (in bytes) ``directory``'s file system takes."""
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not reported (or not POSIX): the common limit
        return 255


def check_creatable(path: str | Path, option: str = "--out", siblings: Iterable[str] = ()) -> None:
    """:class:`CliError` unless ``path`` (absent, or to be replaced) can be created: its
    nearest existing ancestor must be a directory in which an entry can be made. That is
    tried (an empty directory, removed again), since permission bits do not tell (root,
    read-only or virtual file systems such as /proc). The names of the folders to be made,
    ``path``'s own and those of the ``siblings`` written next to it (a staging folder, a
    partial file) must fit the file system's longest name: a name one byte too long used to
    pass here and fail once the work was done."""
    target = Path(os.path.abspath(path))
    ancestor = target.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"{option} {path} cannot be created: {ancestor} is not a directory")
    limit = _name_max(ancestor)
    made = list(target.relative_to(ancestor).parts) if target != ancestor else []
    for name in made + list(siblings):
        if len(os.fsencode(name)) > limit:
            what = "" if name in made else f" (written next to {target.name!r} while it is made)"
            raise CliError(f"{option} {path} cannot be created: the name {name!r}{what} is "
                           f"{len(os.fsencode(name))} bytes, longer than the {limit} that {ancestor} takes; "
                           "give a shorter name")
    probe = None
    try:
        probe = tempfile.mkdtemp(prefix=".unlearnd-probe-", dir=ancestor)
    except OSError as exc:
        raise CliError(f"{option} {path} cannot be created: nothing can be written in {ancestor} "
                       f"({exc.strerror or exc})") from None
    finally:
        if probe is not None:
            os.rmdir(probe)


def check_output_dir(out: str | Path, option: str = "--out") -> list[str]:
    """:class:`CliError` for an ``out`` that :func:`write_dir_atomically` cannot take, so that
    it is refused before the work rather than after it: a path that does not end in the
    directory's own name (``.``, ``..``, ``/``: the new directory is made beside ``out`` and
    renamed to it), a symbolic link (the rename would replace the link, not fill the
    directory it points to), something other than a directory, or a location where nothing
    can be created. Returns the names ``out`` holds (none when it is absent or empty); the
    caller decides whether those may be replaced."""
    given = Path(out)
    if given.name in ("", ".."):
        raise CliError(f"{option} {str(given)!r} does not end in a directory name: the output is made beside "
                       f"{option} and renamed to it; give a path that ends in the new directory's name, "
                       f"e.g. {option} ./out")
    # as write_dir_atomically takes it: `missing/../kept` does not exist until that write makes
    # `missing`, and then it is `kept`, whose files were neither listed nor refused here
    out = Path(os.path.abspath(given))
    # first: a name too long for the file system would fail the lstat calls below
    check_creatable(out, option, siblings=[_staging_name(out, "0" * 12) + suffix for suffix in (".tmp", ".old")])
    if out.is_symlink():
        raise CliError(f"{option} {out} is a symbolic link (to {os.readlink(out)}): the output is a new directory "
                       "renamed into its place, which would replace the link; give the directory itself "
                       f"({os.path.realpath(out)}) or a new path")
    held: list[str] = []
    if os.path.lexists(out):
        if not out.is_dir():
            raise CliError(f"{option} {out} exists and is not a directory")
        held = sorted(p.name for p in out.iterdir())
    return held


_T = TypeVar("_T")


def _staging_name(out: Path, token: str) -> str:
    """The name, less ``.tmp`` or ``.old``, of :func:`write_dir_atomically`'s siblings of ``out``."""
    return f".{out.name}.{token}"


def write_dir_atomically(out: str | Path, write: Callable[[Path], _T], replace: bool = False,
                         writes: Writes | None = None) -> _T:
    """``write(staging)`` fills a new temporary sibling of the directory ``out``, which is
    then renamed to ``out``: a failure (or a kill) leaves no half-written ``out`` (the
    staging folder is removed, or at worst a hidden ``.<name>.*.tmp`` sibling is left).
    ``out`` may be absent or an empty directory; with ``replace``, an existing ``out`` is
    swapped out and removed once the new one is in place. Returns what ``write`` returns.
    ``writes`` records how far it got (for :func:`report_interrupted`). :func:`check_output_dir`
    refuses up front what it cannot take."""
    import uuid

    out = Path(os.path.abspath(out))  # `missing/../kept` is `kept` (check_output_dir checks that one)
    if writes is not None:
        writes.out, writes.state = out, "writing"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / (_staging_name(out, uuid.uuid4().hex[:12]) + ".tmp")
    staging.mkdir()  # (not mkdtemp: the checkpoint gets the umask's permissions, not 0700)
    old = None
    try:
        result = write(staging)
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        elif os.path.lexists(out):
            if not replace:
                raise CliError(f"{out} already exists and is not an empty directory")
            old = staging.with_name(staging.name[: -len(".tmp")] + ".old")
            out.rename(old)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not os.path.lexists(out):
            old.rename(out)  # the replaced one back
        raise
    if old is not None:
        if old.is_symlink():
            old.unlink()
        else:
            shutil.rmtree(old, ignore_errors=True)
    if writes is not None:
        writes.state = "written"
    return result
