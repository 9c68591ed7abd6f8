"""One node per data dir: a lock held for the node's whole life.

Two nodes on one directory would share an identity, a ledger and an admin socket, and
the one that stops first would delete the other's `node.json` and socket. The lock is
an advisory `flock` on `node.lock`, which the kernel releases when the process dies
however it dies, so a killed node never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from kvx.protocol import ConfigError

LOCK_FILE = "node.lock"


class DataDirLock:
    """The claim of one node on its data dir; `release` gives it up."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        _prepare(self.dir)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{self.dir} is in use by another kvx node (PID {holder}); "
                "stop it or choose another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _prepare(data_dir: Path) -> None:
    """Create the data dir private (0700); leave an existing one's mode alone, but refuse
    one that anyone may write to, where others could swap the files a node trusts."""
    try:
        data_dir.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        mode = data_dir.stat().st_mode
        if not stat.S_ISDIR(mode):
            raise ConfigError(f"--data-dir {data_dir} exists and is not a directory") from None
        if mode & stat.S_IWOTH:
            raise ConfigError(
                f"--data-dir {data_dir} is writable by every user (mode {mode & 0o777:o}); "
                "a node keeps its key, ledger and admin socket there: use a private directory"
            ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create --data-dir {data_dir}: {exc.strerror}") from None
