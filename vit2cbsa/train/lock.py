"""The output-folder lock: one run at a time writes an ``--out`` folder.

``OUT/run.lock`` is a JSON file (host, pid, start time, command, and every process of the run)
created atomically (``O_CREAT | O_EXCL``) by the main process before anything else is written to
``OUT``, and removed when the run ends, normally or with an error. A second run on the same folder
refuses with a one-line :class:`~vit2cbsa.errors.UsageError` naming the holder. A lock whose processes are all
gone on this host (a run killed with SIGKILL, a machine that crashed and rebooted) is stale: it is
taken over, with a message. A lock of another host cannot be checked from here: it is never taken
over (delete it by hand once that run is over).

Killing ``accelerate launch`` itself with SIGKILL leaves its worker processes running, training and
writing ``OUT``; the lock names them, so a relaunch refuses (naming their pids) until they are
stopped, instead of racing them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, List, Optional

from ..errors import UsageError, one_line

LOCK_NAME = "run.lock"
_UNREADABLE_GRACE_S = 10.0  # a lock that is empty or cut short and younger than this is being written


def proc_start(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None.
    With the pid it identifies a process: a pid reused by another process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def pid_alive(pid: int, start: Optional[str] = None) -> bool:
    """Whether process ``pid`` (started at ``start``, see :func:`proc_start`) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    except OSError:
        return False
    if _zombie(pid):
        return False
    if start is not None:
        now = proc_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused
    return True


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": proc_start(os.getpid())}


def describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}")


class OutputLock:
    """``folder/run.lock``; :meth:`acquire` then :meth:`release` (only our own lock is removed)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.token: Optional[str] = None

    # ---- reading and judging a lock that exists
    def _read(self) -> Optional[bytes]:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _verdict(self, raw: bytes) -> str:
        """``"live"`` (its run may still be running), ``"young"`` (unreadable: being written right
        now) or why it is stale."""
        try:
            holder = json.loads(raw.decode())
            if not isinstance(holder, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return "young"
            return f"it is unreadable and {age:.0f} s old" if age > _UNREADABLE_GRACE_S else "young"
        here = socket.gethostname()
        procs = holder.get("processes") or [holder]
        if any(p.get("host") != here for p in procs):
            return "live"  # cannot check another host
        if any(isinstance(p.get("pid"), int) and pid_alive(p["pid"], p.get("proc_start")) for p in procs):
            return "live"
        return "no process of that run is running any more"

    def _held_message(self, raw: bytes) -> str:
        try:
            holder = json.loads(raw.decode())
        except (ValueError, UnicodeDecodeError):
            return f"{self.path.parent} is in use: {self.path} is being written by another run starting now"
        here = socket.gethostname()
        procs = holder.get("processes") or [holder]
        msg = f"{self.path.parent} is in use by another run ({describe(holder)}; lock {self.path})"
        other = sorted({p.get("host") for p in procs if p.get("host") != here})
        if other:
            return msg + (f": it runs on {', '.join(map(str, other))}, which cannot be checked from here; "
                          f"if that run is over, delete {self.path}")
        pids = " ".join(str(p["pid"]) for p in procs if isinstance(p.get("pid"), int) and pid_alive(p["pid"]))
        return msg + (f": wait for it to finish or stop it (`kill {pids}`; after a SIGKILLed `accelerate launch` "
                      "its workers keep running until killed)")

    def _take_over(self, raw: bytes) -> bool:
        """Remove the stale lock whose content is ``raw``; False when it changed meanwhile."""
        aside = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # removed by someone else: try again
        if aside.read_bytes() == raw:
            aside.unlink()
            return True
        try:  # another run took the lock between our read and the rename: give it back
            os.link(aside, self.path)
        except OSError:
            pass
        aside.unlink()
        return False

    # ---- taking and giving back
    def acquire(self, processes: Optional[List[dict]] = None, command: Optional[str] = None,
                attempts: int = 20) -> Optional[str]:
        """Create the lock for this process (and ``processes``, every process of the run). Returns a
        message when a stale lock was taken over; raises :class:`~vit2cbsa.errors.UsageError` when the folder is
        in use."""
        info = {**this_process(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": command if command is not None else " ".join(sys.argv)[:2000],
                "processes": processes or [this_process()], "token": uuid.uuid4().hex}
        note = None
        raw = b""
        for _ in range(attempts):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raw = self._read()
                if raw is None:
                    continue  # released meanwhile
                why = self._verdict(raw)
                if why == "live":
                    raise UsageError(self._held_message(raw))
                if why == "young":
                    time.sleep(0.1)
                    continue
                if self._take_over(raw):
                    try:
                        who = describe(json.loads(raw.decode()))
                    except (ValueError, UnicodeDecodeError):
                        who = "unreadable"
                    note = f"taking over the stale lock {self.path} ({who}): {why}"
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            self.token = info["token"]
            return note
        raise UsageError(self._held_message(raw or b""))

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self.token is None:
            return
        raw = self._read()
        try:
            if raw is not None and json.loads(raw.decode()).get("token") == self.token:
                self.path.unlink()
        except (ValueError, UnicodeDecodeError, OSError):
            pass
        self.token = None


@contextlib.contextmanager
def hold_output_lock(accelerator: Any, folder: Path) -> Iterator[None]:
    """Hold ``folder/run.lock`` for the block, for every process of an Accelerate run: taken by the main process
    once all have started (the lock names them all) and before any goes its own way; every process raises the
    same :class:`~vit2cbsa.errors.UsageError` when another run holds it. Released at the end, also on an error."""
    acc = accelerator
    me = [this_process()]
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        procs = gather_object(me)  # every process has started; none has written anything
    else:
        procs = me
    lock = OutputLock(folder)
    outcome: List[Any] = [("ok", None)]
    if acc.is_main_process:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            outcome = [("ok", lock.acquire(procs))]
        except UsageError as e:
            outcome = [("held", str(e))]
        except OSError as e:
            outcome = [("held", f"cannot create the lock {lock.path}: {one_line(e)}")]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)  # the other processes wait here for the main one's lock
    kind, message = outcome[0]
    if kind != "ok":
        raise UsageError(message)
    if message:
        acc.print(message)
    try:
        yield
    finally:
        if acc.is_main_process:
            lock.release()
