"""Build leases: one builder per (stage, round, version), across processes and hosts.

A lease is a small JSON file created with O_CREAT | O_EXCL (atomic on local filesystems and on NFS
v3+), holding the builder's host, pid, a random token, the time of its last heartbeat and its
time-to-live. While the build runs, a daemon thread rewrites the heartbeat every ttl/3. Another
builder that finds the file waits; it takes the lease over only when the lease is stale:

* the heartbeat is older than the lease's ttl (a crashed or unreachable builder on any host), or
* the holder is on this host and its pid is dead (a SIGKILLed builder: no need to wait).

A lease on another host is never judged by its pid (pids mean nothing across hosts), only by its
heartbeat. Taking over renames the stale file aside first, so two waiters cannot both win.
The registry owns the leases (`Registry.lease`); stages never see them.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_TTL_S = float(os.environ.get("RLHF_LEASE_TTL", "60"))
HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def read_lease(path: Path) -> dict[str, Any] | None:
    """The lease's content; {} if it exists but cannot be read (being written, or corrupt); None if absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def lease_state(path: Path, info: dict[str, Any] | None = None, now: float | None = None) -> str:
    """'free' (no lease), 'held' (a live builder), or 'stale' (dead or silent for longer than its ttl)."""
    info = read_lease(path) if info is None else info
    if info is None:
        return "free"
    now = time.time() if now is None else now
    if not info:  # unreadable: judge by the file's age, so a half-written lease is not taken over at once
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            return "free"
        return "stale" if age > DEFAULT_TTL_S else "held"
    if info.get("host") == HOST and isinstance(info.get("pid"), int) and not pid_alive(info["pid"]):
        return "stale"
    if now - float(info.get("heartbeat_at", 0)) > float(info.get("ttl_s", DEFAULT_TTL_S)):
        return "stale"
    return "held"


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "an unknown builder"
    age = time.time() - float(info.get("heartbeat_at", 0))
    return f"pid {info.get('pid')} on {info.get('host')} (heartbeat {age:.0f}s ago, ttl {info.get('ttl_s')}s)"


@dataclass
class Lease:
    """A held lease; `release()` (or leaving the `with` block) gives it up."""

    path: Path
    token: str
    ttl_s: float
    contended: bool = False  # another builder held it (or a stale lease was in the way) when we asked
    took_over: dict[str, Any] | None = None  # the stale lease it replaced, if any
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _content(self) -> dict[str, Any]:
        return {"host": HOST, "pid": os.getpid(), "token": self.token, "ttl_s": self.ttl_s, "heartbeat_at": time.time()}

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            info = read_lease(self.path)
            if not info or info.get("token") != self.token:
                return  # taken over (we were silent for longer than the ttl): nothing of ours to refresh
            tmp = self.path.with_name(f".{self.path.name}.{self.token}.hb")
            try:
                tmp.write_text(json.dumps(self._content()), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError:
                tmp.unlink(missing_ok=True)

    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.path.name}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        info = read_lease(self.path)
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _try_create(path: Path, lease: Lease) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(lease._content()).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _take_over(path: Path, stale: dict[str, Any]) -> bool:
    """Move a stale lease aside. If someone else replaced it meanwhile, put theirs back."""
    aside = path.with_name(f".{path.name}.stale-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = read_lease(aside)
    if stale and moved and moved.get("token") != stale.get("token"):  # we grabbed a live lease: restore it
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def acquire(path: Path, ttl_s: float = DEFAULT_TTL_S, wait: bool = True, poll_s: float = 0.2,
            on_wait: Callable[[dict[str, Any] | None], None] | None = None) -> Lease | None:
    """Take the lease at `path`, waiting for a live holder unless `wait=False` (then None if held)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lease = Lease(path, secrets.token_hex(8), ttl_s)
    told = False
    while True:
        if _try_create(path, lease):
            return lease.start()
        lease.contended = True
        info = read_lease(path)
        state = lease_state(path, info)
        if state == "stale":
            if _take_over(path, info or {}):
                lease.took_over = info or {}
            continue
        if state == "free":
            continue
        if not wait:
            return None
        if on_wait is not None and not told:
            on_wait(info)
            told = True
        time.sleep(poll_s)
