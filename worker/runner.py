"""Who runs a job: the process that claimed it, named so that another process can tell,
without waiting for the heartbeat to go stale, that it is gone.

A job's heartbeat stops when its process is killed (SIGKILL, the kernel's OOM killer, a
crash in native code): the job stays ``running`` until the sweeper finds the heartbeat
``stale_after_s`` (10 minutes) old. Each claim records :func:`this_process` on the job
(``jobs.runner``); a claim, the sweeper or a start of ``unlearnd serve`` that finds a
running job whose runner :func:`is_gone` puts it back in the queue at once (``job.requeued``,
reason :data:`GONE_REASON`). Celery redelivers the task of a pool process that died
(``task_reject_on_worker_lost``), so the job runs again within seconds.

Only a process in the same PID namespace of the same machine, since its boot, can tell:
``host``, ``boot_id`` and ``pid_ns`` must all be this process's. The PID is then looked
up in ``/proc``; its start time (clock ticks since boot) tells a reused PID from the
runner. Whatever cannot be read (no ``/proc``: not Linux; another container; a runner
recorded before migration 0011) counts as alive: the sweeper's heartbeat rule is left.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

GONE_REASON = "its worker process is gone (killed?)"

_PROC = Path("/proc")
_KEYS = ("host", "boot_id", "pid_ns", "pid", "start")
_cached: dict[int, dict[str, Any] | None] = {}  # per PID: a forked pool process is another runner


def _start_ticks(pid: int) -> tuple[int, str] | None:
    """``(start time in clock ticks since boot, state)`` of ``pid`` from ``/proc/<pid>/stat``,
    ``None`` when there is no such process (or it cannot be read)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ... starttime(22)": comm may hold spaces and parentheses
    fields = stat[stat.rindex(")") + 2:].split()
    try:
        return int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


def _machine() -> dict[str, Any] | None:
    try:
        boot_id = (_PROC / "sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.stat(_PROC / "self/ns/pid").st_ino
    except OSError:
        return None
    return {"host": socket.gethostname(), "boot_id": boot_id, "pid_ns": pid_ns}


def this_process() -> dict[str, Any] | None:
    """This process as a job's runner: ``{"host", "boot_id", "pid_ns", "pid", "start"}``,
    or ``None`` where ``/proc`` cannot tell (then no process can find it gone)."""
    pid = os.getpid()
    if pid not in _cached:
        machine = _machine()
        started = _start_ticks(pid)
        _cached[pid] = None if machine is None or started is None else {**machine, "pid": pid, "start": started[0]}
    found = _cached[pid]
    return None if found is None else dict(found)


def is_gone(runner: Any) -> bool:
    """Whether ``runner`` (a job's recorded :func:`this_process`) has ended: it was in this
    process's PID namespace on this machine since its boot, and its PID now names no process,
    a zombie, or another process (started at another time). False whenever that cannot be
    told for certain."""
    if not isinstance(runner, dict) or not all(k in runner for k in _KEYS):
        return False
    here = _machine()
    if here is None or any(runner[k] != here[k] for k in ("host", "boot_id", "pid_ns")):
        return False
    pid, start = runner["pid"], runner["start"]
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(start, int):
        return False
    now = _start_ticks(pid)
    if now is None:
        return (_PROC / "self").exists()  # the PID is free (and /proc is there to say so)
    started, state = now
    return started != start or state in ("Z", "X")  # a reused PID; killed, not yet reaped
