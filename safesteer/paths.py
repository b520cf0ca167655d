"""Where SafeSteer keeps its caches, and atomic writes for every artifact it produces."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safesteer.errors import SafeSteerError


def cache_dir() -> Path:
    """``$SAFESTEER_CACHE`` or ``~/.cache/safesteer``."""
    root = os.environ.get("SAFESTEER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "safesteer")
    return Path(root)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync it and rename it to ``final``.

    On an exception (an interrupt included) the temporary directory is removed and ``final`` is
    untouched. An existing ``final`` is replaced only after the new one is complete; with
    ``keep_existing`` (cache entries: equal content by their key) it is kept and the new one dropped,
    so that concurrent writers of one entry end with one complete entry, whichever finished first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if keep_existing:
            try:
                os.rename(tmp, final)
            except OSError as e:  # another writer's complete entry is there already
                if not final.is_dir() or e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        elif final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old, final)  # put the old one back: ``final`` must survive a failed swap
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


LOCK_FILE = ".safesteer.lock"


def lock_holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock (``host ..., pid ..., started ...``), or None when it is free.

    The lock is an ``flock`` on ``<run_dir>/.safesteer.lock``: the kernel drops it when its process
    ends, however it ends (SIGKILL included), so a lock file left behind by a crash is stale by itself.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(os.read(fd, 4096))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process that has not written its name yet"


class RunLock:
    """The exclusive lock of a run directory, held while a run writes into it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise a one-line error naming its holder. A stale lock file is reused."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(os.read(fd, 4096))
                os.close(fd)
                raise SafeSteerError(
                    f"{self.path.parent}: run directory in use by another run ({holder}); wait for it "
                    "to end, stop it, or choose another hydra.run.dir"
                ) from None
            try:  # the holder before us may have removed the file between our open and our flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)  # closing drops the flock
        self.fd = None
