"""Who runs a job: the process that claimed it, named so that another process can tell,
without waiting for the heartbeat to go stale, that it is gone.

A job's heartbeat stops when its process is killed (SIGKILL, the kernel's OOM killer, a
crash in native code): the job stays ``running`` until the sweeper finds the heartbeat
``stale_after_s`` (10 minutes) old. Each claim records :func:`this_process` on the job
(``jobs.runner``); a claim, the sweeper or a start of ``unlearnd serve`` that finds a
running job whose runner :func:`is_gone` puts it back in the queue at once (``job.requeued``,
reason :data:`GONE_REASON`). Celery redelivers the task of a pool process that died
(``task_reject_on_worker_lost``), so the job runs again within seconds.

Only a process in the same PID (and time) namespace of the same machine, since its boot,
can tell: ``host``, ``boot_id``, ``pid_ns`` and ``time_ns`` must all be this process's.
The kernel then says whether the PID names a process (``kill(pid, 0)``), and its start
time in ``/proc/<pid>/stat`` (clock ticks since boot) tells a reused PID from the runner.
Whatever cannot be read (no ``/proc``: not Linux; a ``/proc`` of another PID namespace;
another container; a stat hidden by ``hidepid``; a runner recorded before migration
0011) counts as alive: the sweeper's heartbeat rule is left.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

GONE_REASON = "its worker process is gone (killed?)"

_PROC = Path("/proc")
_SAME = ("host", "boot_id", "pid_ns", "time_ns")  # what must be this process's to tell
_KEYS = (*_SAME, "pid", "start")
_cached: dict[int, dict[str, Any] | None] = {}  # per PID: a forked pool process is another runner
if hasattr(os, "register_at_fork"):  # a child may later get an ancestor's PID: never its record
    os.register_at_fork(after_in_child=_cached.clear)


def _start_ticks(pid: int) -> tuple[int, str] | None:
    """``(start time in clock ticks since boot, state)`` of ``pid`` from ``/proc/<pid>/stat``,
    ``None`` when it cannot be read (no such process, or hidden: ``hidepid``)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_bytes()  # the name may be any bytes
    except OSError:
        return None
    # "pid (comm) state ppid ... starttime(22)": comm may hold spaces and parentheses
    fields = stat[stat.rindex(b")") + 2:].split()
    try:
        return int(fields[19]), fields[0].decode("ascii", "replace")
    except (IndexError, ValueError):
        return None


def _exists(pid: int) -> bool | None:
    """Whether ``pid`` names a process (a zombie too) in this PID namespace, by the kernel
    (``kill(pid, 0)``: EPERM is a process of another user); None when it cannot say."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def _ns_inode(name: str) -> int | None:
    try:
        return os.stat(_PROC / "self/ns" / name).st_ino
    except OSError:
        return None


def _machine() -> dict[str, Any] | None:
    """This process's machine, boot and namespaces; None where ``/proc`` cannot tell them
    (not Linux, or a ``/proc`` of another PID namespace: its ``self`` is not this PID)."""
    try:
        boot_id = (_PROC / "sys/kernel/random/boot_id").read_text().strip()
        if os.readlink(_PROC / "self") != str(os.getpid()):
            return None
    except OSError:
        return None
    pid_ns = _ns_inode("pid")
    if pid_ns is None:
        return None
    # start times are ticks since boot as this time namespace sees it (CLONE_NEWTIME offsets it)
    return {"host": socket.gethostname(), "boot_id": boot_id, "pid_ns": pid_ns, "time_ns": _ns_inode("time")}


def this_process() -> dict[str, Any] | None:
    """This process as a job's runner: ``{"host", "boot_id", "pid_ns", "time_ns", "pid", "start"}``,
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
    process's PID and time namespaces on this machine since its boot, and its PID now names
    no process (the kernel says so), a zombie, or another process (started at another time).
    False whenever that cannot be told for certain (a ``/proc`` entry hidden from this user
    is a live process)."""
    if not isinstance(runner, dict) or not all(k in runner for k in _KEYS):
        return False
    here = this_process()  # this process's machine and namespaces, read once per process
    if here is None or any(runner[k] != here[k] for k in _SAME):
        return False
    pid, start = runner["pid"], runner["start"]
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(start, int):
        return False
    exists = _exists(pid)
    if exists is None:
        return False
    if not exists:
        return True
    now = _start_ticks(pid)
    if now is None:  # there, but its stat hidden (hidepid), or it ended this instant: alive
        return False
    started, state = now
    return started != start or state in ("Z", "X")  # a reused PID; killed, not yet reaped
