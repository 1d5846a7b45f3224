"""Leases: an exclusive claim on one unit of work across every process that uses the store.

Two runs of the same checkpoint share a run id and so a store. A stage takes a *lease* before it
writes: an object created atomically (local: hard link, which fails if the name exists; S3: a
conditional put, ``If-None-Match: *``), kept alive by a heartbeat and released when the stage
ends. A second run waits for the lease, then finds the marker and reuses the result. A lease whose
holder died (same host and its pid is gone, or no heartbeat for its TTL) is taken over by creating
the next generation, which again only one process can do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextvars import ContextVar
from typing import Any, Protocol

from lens_core.settings import settings
from lens_core.store.errors import LeaseLostError

log = logging.getLogger("lens_core.store")


def _lease_ttl() -> float:
    return settings().lease_ttl_s


def _lease_poll() -> float:
    return settings().lease_poll_s


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD: ContextVar[tuple[Lease, ...]] = ContextVar("lens_leases_held", default=())


def check_leases_held() -> None:
    """Fence for completion markers: raise LeaseLostError if a lease held in this context was
    taken over.

    A holder frozen past the TTL (a paused process, a stalled host) is replaced; when it wakes it
    must not mark the stage complete over the new holder's work.
    """
    for lease in _HELD.get():
        if not lease.held():
            raise LeaseLostError(
                f"lease {lease.prefix} was taken over by another process; "
                "this attempt's work is left unmarked"
            )


class LeaseStore(Protocol):
    """What a lease needs of a store: files under run-relative paths, one created exclusively."""

    def list(self, rel: str) -> list[str]: ...

    def read_bytes(self, rel: str) -> bytes: ...

    def write_bytes(self, rel: str, data: bytes) -> None: ...

    def create_exclusive(self, rel: str, data: bytes) -> bool: ...

    def delete(self, rel: str) -> None: ...

    def prune(self, rel: str) -> None: ...


class Lease:
    """An exclusive claim on one unit of work (a stage of a class) across every process on the
    store.

    Objects ``locks/<name>/<generation>.json``; the highest generation is the lease. Acquire by
    creating generation 0 (none exists) or the next one (the current holder is gone), atomically.
    """

    def __init__(
        self, store: LeaseStore, prefix: str, ttl: float | None = None, poll: float | None = None
    ):
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.ttl = ttl if ttl is not None else _lease_ttl()
        self.poll = poll if poll is not None else _lease_poll()
        self.token = uuid.uuid4().hex
        self.generation: int | None = None
        self.waited = 0.0
        self._beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[tuple[int, str], tuple[int, float]] = {}

    def _rel(self, gen: int) -> str:
        return f"{self.prefix}/{gen:08d}.json"

    def _record(self) -> bytes:
        return json.dumps(
            {
                "token": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "beats": self._beats,
                "ttl": self.ttl,
                "at": time.time(),
            }
        ).encode()

    def _generations(self) -> list[int]:
        gens = []
        for name in self.store.list(self.prefix):
            stem = name[: -len(".json")] if name.endswith(".json") else ""
            if stem.isdigit():
                gens.append(int(stem))
        return sorted(gens)

    def _stale(self, gen: int, rec: dict[str, Any]) -> bool:
        if rec.get("host") == socket.gethostname() and not _pid_alive(int(rec.get("pid", 0))):
            return True
        key, now = (gen, str(rec.get("token"))), time.monotonic()
        beats = int(rec.get("beats", 0))
        seen = self._seen.get(key)
        if seen is None or seen[0] != beats:
            self._seen[key] = (beats, now)
            return False
        return now - seen[1] >= float(rec.get("ttl", self.ttl))

    def acquire(self) -> Lease:
        """Block until this process holds the lease."""
        t0 = time.monotonic()
        logged = False
        while True:
            gens = self._generations()
            target = 0
            if gens:
                top = gens[-1]
                try:
                    rec = json.loads(self.store.read_bytes(self._rel(top)))
                except FileNotFoundError:
                    continue  # released while we looked
                except (json.JSONDecodeError, UnicodeDecodeError):
                    rec = {}
                if not self._stale(top, rec):
                    if not logged:
                        log.info(
                            "waiting for %s: held by %s pid %s",
                            self.prefix,
                            rec.get("host"),
                            rec.get("pid"),
                        )
                        logged = True
                    time.sleep(self.poll)
                    continue
                target = top + 1
            if self.store.create_exclusive(self._rel(target), self._record()):
                self.generation = target
                self.waited = time.monotonic() - t0
                for old in gens:  # generations of dead holders
                    with contextlib.suppress(Exception):
                        self.store.delete(self._rel(old))
                self._start_heartbeat()
                return self

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"lease:{self.prefix}", daemon=True
        )
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(0.05, self.ttl / 4)):
            try:
                if not self.held():
                    log.warning("lease %s was taken over by another process", self.prefix)
                    return
                self._beats += 1
                self.store.write_bytes(self._rel(self.generation), self._record())
            except Exception as err:  # noqa: BLE001 - a missed beat is only a missed beat
                log.debug("lease heartbeat %s failed: %s", self.prefix, type(err).__name__)

    def held(self) -> bool:
        """True while our generation is the highest one and still carries our token."""
        if self.generation is None:
            return False
        gens = self._generations()
        if not gens or gens[-1] != self.generation:
            return False
        try:
            return (
                json.loads(self.store.read_bytes(self._rel(self.generation))).get("token")
                == self.token
            )
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def release(self) -> None:
        """Stop the heartbeat and delete our generation (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.generation is not None:
            with contextlib.suppress(Exception):
                rec = json.loads(self.store.read_bytes(self._rel(self.generation)))
                if rec.get("token") == self.token:
                    self.store.delete(self._rel(self.generation))
            with contextlib.suppress(OSError):
                self.store.prune(self.prefix)  # no empty lock folders left behind
            self.generation = None

    def __enter__(self) -> Lease:
        self.acquire()
        self._ctx = _HELD.set((*_HELD.get(), self))
        return self

    def __exit__(self, *exc: object) -> None:
        _HELD.reset(self._ctx)
        self.release()
