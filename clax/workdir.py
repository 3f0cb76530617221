"""A workdir that cannot be corrupted: atomic writes, one run at a time, moving a run aside.

Atomic writes. Every file clax writes into a workdir (``results.json``, ``metrics.csv``,
``accuracy_matrix.png``, the pretraining cache under ``pretrain/``) goes through :func:`atomic_open`:
the bytes go to a temporary file in the same folder (``.<name>.<host>-<pid>-<random>.tmp``), which is
flushed, fsynced and renamed over the target, and the folder is fsynced. A reader therefore sees the
old file or the new one, never a part; a process killed while writing leaves at most its temporary
file, which the next write of that file removes (:func:`remove_stale_temps`: only those whose
process is gone). (Checkpoints are written by
Orbax, which finalises each one with a rename of its own.)

One run per workdir. :func:`lock` takes an exclusive ``fcntl.flock`` on ``<workdir>/.clax.lock`` for
the whole run; the file names the holder (pid, host, start time) for the message a second run gets
(:class:`WorkdirBusy`, a ``ValueError``: the ``clax`` command prints it on one line and exits 2). The
kernel releases the lock when its process dies, so a lock file left by a killed run is taken over: its
text is only informative and never blocks.

Moving a run aside. :func:`move_aside` (``--fresh``) moves a workdir's contents to ``<workdir>.old-N``
while the caller holds the lock, which stays where it is.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
import sys
import time
from typing import IO, Iterator, Optional

LOCK_NAME = ".clax.lock"


class WorkdirBusy(ValueError):
    """Another live process holds the workdir's lock."""


def say(msg: str) -> None:
    """Prints ``clax: msg`` as one line on stderr."""
    print(f"clax: {msg}", file=sys.stderr, flush=True)


def fsync_dir(path: str) -> None:
    """fsyncs the folder ``path`` (so that a rename in it survives a crash); a no-op where the
    platform cannot open folders."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _host() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def temp_name(path: str) -> str:
    """A fresh temporary name beside ``path``: ``.<name>.<host>-<pid>-<random>.tmp``."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """A file object to write ``path`` atomically (``mode`` ``"w"`` or ``"wb"``; ``kwargs`` go to
    :func:`open`, e.g. ``newline=""``).

    The content goes to a temporary file beside ``path``; when the block ends without an exception it
    is flushed, fsynced and renamed over ``path``, and the folder is fsynced. When the block raises, the
    temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    remove_stale_temps(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write(path: str, data: bytes | str) -> None:
    """Writes ``data`` (bytes, or text as UTF-8) to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str) -> list[str]:
    """Removes the temporary files of :func:`atomic_open` for ``path`` whose writer, a process on this
    host, is gone (a run killed while writing); returns their paths. Others' live writes are left."""
    d, base = os.path.split(os.path.abspath(path))
    prefix, host = f".{base}.", _host()
    out = []
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        who = name[len(prefix):-len(".tmp")].rsplit("-", 2)
        if len(who) != 3 or who[0] != host or not who[1].isdigit() or _alive(int(who[1])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(d, name))
            out.append(os.path.join(d, name))
    return out


def set_aside(path: str, tag: str = "damaged") -> str:
    """Renames ``path`` to ``<path>.<tag>-N`` (the first free N) and returns the new name."""
    n = 1
    while os.path.lexists(f"{path}.{tag}-{n}"):
        n += 1
    os.rename(path, f"{path}.{tag}-{n}")
    return f"{path}.{tag}-{n}"


class Lock:
    """The held lock of a workdir (see :func:`lock`); :meth:`release` gives it back."""

    def __init__(self, workdir: str, fd: int, path: str, created: list[str]):
        self.workdir, self.fd, self.path, self.created = workdir, fd, path, created

    def release(self) -> None:
        """Removes the lock file (if it is still this lock's), unlocks, and removes the folders
        :func:`lock` created if they are still empty (a run refused before writing anything)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                os.rmdir(d)

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _makedirs(workdir: str) -> list[str]:
    """Creates ``workdir`` and missing parents; returns those created (outermost first). OS errors
    become one-line ``ValueError``s naming the workdir."""
    missing, d = [], os.path.abspath(workdir)
    while not os.path.isdir(d):
        if os.path.lexists(d):
            what = "is a file, not a directory" if d == os.path.abspath(workdir) else f"has {d}, a file, in its path"
            raise ValueError(f"workdir {workdir} {what}; use another --workdir")
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    created = []
    try:
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise
                continue  # made meanwhile by another process (the main job's workers share the parent)
            created.append(d)
    except OSError as e:
        for c in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(c)
        why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS:
               "read-only file system", errno.ENAMETOOLONG: "name too long", errno.ENOSPC: "no space left"}
        raise ValueError(f"cannot create workdir {workdir}: {why.get(e.errno, e.strerror or str(e))}") from None
    return created


def lock(workdir: str) -> Lock:
    """Takes ``workdir``'s run lock (creating the workdir where needed) and writes the holder into it.

    Raises:
      WorkdirBusy: a live process holds it; the one-line message names the workdir and that process.
      ValueError: the workdir cannot be created or is not writable (one line, naming it).
    """
    created = _makedirs(workdir)
    path = os.path.join(workdir, LOCK_NAME)
    try:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise ValueError(f"workdir {workdir} is not writable ({e.strerror or e})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 4096, 0).decode(errors="replace").split()
                os.close(fd)
                info = dict(zip(text[::2], text[1::2]))
                who = f"pid {info.get('pid', 'unknown')}"
                who += f" on host {info['host']}" if "host" in info else ""
                who += f", started {info['started']}" if "started" in info else ""
                raise WorkdirBusy(f"workdir {workdir} is in use by another clax run ({who}); wait for it "
                                  f"to end or use another --workdir") from None
            try:  # the file may have been removed (by its last holder) between open and flock: retry
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} host {_host()} started {stamp}\n".encode(), 0)
    except BaseException:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    return Lock(workdir, fd, path, created)


def move_aside(workdir: str, keep: tuple = (LOCK_NAME,), link: tuple = ("pretrain",)) -> Optional[str]:
    """Moves the contents of ``workdir`` (except ``keep``, e.g. the held lock file) into
    ``<workdir>.old-N`` (the first free N), for a run that starts over; returns that folder, or None
    when there was nothing to move. Folders in ``link`` (content-addressed caches such as the
    pretraining cache) stay in ``workdir``; the old folder gets hard links (or copies) of their files.
    The caller holds ``workdir``'s lock.
    """
    import shutil

    names = sorted(n for n in os.listdir(workdir) if n not in keep)
    if not any(n not in link for n in names):
        return None
    base = os.path.normpath(os.path.abspath(workdir))
    n = 1
    while os.path.lexists(f"{base}.old-{n}"):
        n += 1
    old = f"{base}.old-{n}"
    os.mkdir(old)
    for name in names:
        src = os.path.join(workdir, name)
        if name in link and os.path.isdir(src):
            os.mkdir(os.path.join(old, name))
            for f in os.listdir(src):
                s, t = os.path.join(src, f), os.path.join(old, name, f)
                if os.path.isfile(s) and not f.endswith(".tmp"):
                    try:
                        os.link(s, t)
                    except OSError:
                        shutil.copy2(s, t)
            continue
        os.rename(src, os.path.join(old, name))
    fsync_dir(old)
    fsync_dir(workdir)
    return old
