"""Crash-safe file writes: every artifact is written to a temporary name in the same folder, then renamed.

A killed process therefore leaves either the old file or the new one, never a partial one. `BackgroundWriter` runs
such writes on a thread of their own, so a GPU loop does not wait on PNG encoding and fsync.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; artifacts get the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on `<path>.lock` (POSIX flock; nothing where there is none), so that a
    read-modify-write of `path` by two processes on one machine (two `evaluate` calls on one run) loses nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; writes stay atomic, concurrent updates may drop one another's
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line. A crash can at worst leave one incomplete last line, which readers skip.

    After such a crash the torn line is ended first, so the new record starts a line of its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + (json.dumps(record) + "\n").encode("utf-8"))  # appends at the end
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, skipping a torn last line left by a killed writer."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def save_image(path: str | os.PathLike, image) -> None:
    """Save a PIL image atomically (format from the suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=_FORMATS.get(path.suffix.lower(), "PNG"))


_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name and move it into place only when the block succeeds.

    An error (bad input found half-way) leaves no trace: the stage dir is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final.name + ".", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class BackgroundWriter:
    """Runs write tasks on one thread, in the order submitted, while the caller goes on computing.

    At most `max_pending` tasks wait (`submit` blocks beyond that), so memory stays bounded however fast the caller
    produces. The first error a task raises is raised in the caller by the next `submit` or by `close` (leaving the
    `with` block), and no later task runs, so files written after a failed one never exist. Tasks write with the
    functions above (temporary file, fsync, rename): a crash leaves whole files only.
    """

    def __init__(self, max_pending: int = 4, name: str = "promptset-writer"):
        self._tasks: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            if self._error is None:  # after a failure the rest are drained, not run
                try:
                    task()
                except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn, *args, **kwargs) -> None:
        """Queue `fn(*args, **kwargs)`; raises the error of an earlier task, if one failed."""
        self._raise()
        self._tasks.put(functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Wait until every queued task ran; raise the first error of any."""
        if self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
            return
        try:  # the block failed: finish what was queued (whole files), keep the block's error
            self.close()
        except BaseException:  # noqa: BLE001
            pass
