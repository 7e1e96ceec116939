"""Safe outputs shared by every command: atomic folders and files, output locks, and the checks
that keep an output from swallowing its own inputs or the working directory.

- `check_output(out, inputs=...)`: refuse an output that is (or contains) an input, the working
  directory or one of its parents, or the home folder, before anything is written or replaced.
- `AtomicFolder(target, force=...)`: build into a hidden temporary folder beside `target`, then
  swap it in; an old `target` (with `force`) is removed only once the new one is complete. The
  run holds the publish lock of `target` (`.NAME.bidirlm-lock` beside it) from start to end, so a
  second run to the same target is refused at once; and the commit re-checks the target right
  before the rename: a target that appeared since the run started (another program, the user) is
  refused unless `force`, and even with `force` a folder a live bidirlm run holds is never
  replaced. On an error, Ctrl-C or SIGTERM the temporary folder is removed; folders of killed
  processes (`.NAME.tmp-PID-HOST-RANDOM`, PID dead on this host) and their publish locks are
  removed by the next run in the same parent folder. Nothing else is ever deleted.
- `atomic_write(path, write)`: the same for one file (temporary file + `os.replace`).
- `OutputLock(folder)`: one process per output folder (`.bidirlm.lock` holds the pid and host;
  an `flock` makes it exclusive; the lock of a dead process on this host is taken over).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

LOCK_NAME = ".bidirlm.lock"
# The tokenizer files a model folder may carry, copied with it by export, merge and compose (one
# list: a copy that lacked spiece.model once lost a SentencePiece tokenizer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
)
# .NAME.tmp-PID-HOST-RANDOM / .NAME.old-PID-HOST-RANDOM: what AtomicFolder creates, nothing else
_TEMP = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}$"
)
# .NAME.bidirlm-lock: the publish lock of the folder NAME beside it (see AtomicFolder)
PUBLISH_LOCK_SUFFIX = ".bidirlm-lock"
_PUBLISH_LOCK = re.compile(r"^\.(?P<name>.+)" + re.escape(PUBLISH_LOCK_SUFFIX) + "$")


class OutputError(ValueError):
    """An output that cannot be written or would destroy something: one line naming the path."""


def host_tag() -> str:
    """8 hex digits naming this host in temporary names (hostnames may hold '-' and '.')."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def write_error(exc: OSError, path: str | os.PathLike) -> OutputError:
    """One-line error for a failed write (read-only folder, disk full, permissions)."""
    reason = exc.strerror or (errno.errorcode.get(exc.errno or 0)) or str(exc)
    name = exc.filename
    if (
        name is None
        or _TEMP.match(Path(str(name)).name)
        or _TEMP.match(Path(str(name)).parent.name)
        or _PUBLISH_LOCK.match(Path(str(name)).name)
    ):
        name = path  # our temporary or lock beside the output: name the output the user gave
    return OutputError(f"cannot write {name}: {reason}")


def check_output(
    output: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), what: str = "output"
) -> Path:
    """Refuse an output folder whose replacement would delete an input, the working directory
    (or a parent of it) or the home folder; returns the output as given."""
    out = Path(output)
    resolved = out.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(
            f"{what} {output} is the working directory or one of its parents: refusing to "
            "write there (choose a new folder)"
        )
    if resolved == Path.home().resolve():
        raise OutputError(f"{what} {output} is the home folder: refusing to write there")
    for item in inputs:
        src = Path(item).expanduser().resolve()
        if src == resolved or resolved in src.parents:
            raise OutputError(
                f"{what} {output} {'is' if src == resolved else 'contains'} the input {item}: "
                "refusing to replace it (choose another folder)"
            )
    return out


class _Terminated(SystemExit):
    """Raised in the main thread on SIGTERM so that `finally` blocks clean up (exit code 143)."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(128 + signum)


@contextlib.contextmanager
def sigterm_cleans_up() -> Iterator[None]:
    """While active, SIGTERM unwinds the main thread like Ctrl-C (cleanup runs, exit 143).

    Only when the handler is the default one (a trainer's own handler is left alone) and only in
    the main thread (signals are delivered there)."""
    install = threading.current_thread() is threading.main_thread()
    previous: Any = None
    if install:
        previous = signal.getsignal(signal.SIGTERM)
        install = previous == signal.SIG_DFL
    if install:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, previous)


def _temp_name(target: Path, kind: str) -> Path:
    name = f".{target.name}.{kind}-{os.getpid()}-{host_tag()}-{secrets.token_hex(4)}"
    return target.parent / name


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Remove the temporary folders and files that killed runs left in `parent` (ours by name,
    owner pid dead on this host); an `.old-` folder only once its replacement is in place."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = host_tag()
    for entry in entries:
        if _PUBLISH_LOCK.match(entry.name) and entry.is_file() and not entry.is_symlink():
            if _remove_dead_lock(entry):
                removed.append(entry)
            continue
        m = _TEMP.match(entry.name)
        if not m or m["host"] != host or pid_alive(int(m["pid"])) or entry.is_symlink():
            continue
        if entry.is_file() and m["kind"] == "tmp":  # an atomic_write of a killed run
            entry.unlink(missing_ok=True)
            removed.append(entry)
            continue
        if not entry.is_dir():
            continue
        if m["kind"] == "old" and not (parent / m["name"]).exists():
            continue  # killed mid-swap: the old output is the only copy; leave it to the user
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _lock_holder(raw: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _remove_dead_lock(path: Path) -> bool:
    """Remove the lock file `path` when no process holds it and its recorded owner (if any) is
    a dead process on this host; the flock is held while unlinking (see OutputLock.acquire)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held (or no flock here: leave it to the pid check of acquire)
        holder = _lock_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        pid, host = holder.get("pid"), holder.get("host")
        if holder and (host != socket.gethostname() or not isinstance(pid, int)):
            return False
        if isinstance(pid, int) and pid_alive(pid):
            return False
        try:
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                return False
        except FileNotFoundError:
            return False
        path.unlink()
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def folder_in_use(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a live bidirlm process holding `folder`'s `OutputLock` (a training run,
    a pipeline), else None. Reads only: nothing is created or changed."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = _lock_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return holder or {"pid": "?", "host": "?"}
        except OSError:  # no flock on this filesystem: the pid record decides
            pid = holder.get("pid")
            local = holder.get("host") == socket.gethostname()
            if holder and (not local or (isinstance(pid, int) and pid_alive(pid))):
                return holder
        return None
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFolder:
    """A temporary folder beside `target` that becomes `target` on `commit()`, or disappears.

    `force` allows replacing an existing `target` (removed only after the new folder is in
    place); `replace_empty` allows replacing a `target` that is an empty folder when the run
    starts and still empty at the commit; `inputs` are folders the output must not be or contain
    (see `check_output`). From `__enter__` to `__exit__` the run holds the publish lock of
    `target` (a second run to the same target is refused), and `commit()` re-checks the target
    right before the rename. Subclasses set `error` to raise their own exception type.
    """

    error: type[Exception] = OutputError

    def __init__(
        self,
        target: str | os.PathLike,
        *,
        force: bool = False,
        inputs: Iterable[str | os.PathLike] = (),
        replace_empty: bool = False,
    ) -> None:
        self.target = Path(target)
        self.force = force
        self.replace_empty = replace_empty
        self.inputs = list(inputs)
        self.tmp: Path | None = None
        self._made_parents: list[Path] = []
        self._signals: contextlib.ExitStack | None = None
        self._lock: OutputLock | None = None
        self._was_empty = False  # target was an empty folder at the start (replace_empty)

    def _fail(self, message: str) -> Exception:
        return self.error(message)

    def _check_target(self, when: str) -> None:
        """Refuse a target we may not replace: `when` is "start" or "commit"."""
        target = self.target
        if not (target.exists() or target.is_symlink()):
            return
        if target.is_symlink() or not target.is_dir():
            raise self._fail(f"output {target} exists and is not a folder")
        if not self.force:
            empty = not any(target.iterdir())
            if when == "start":
                if self.replace_empty and empty:
                    self._was_empty = True
                    return
                raise self._fail(f"output {target} already exists (use --force / force=True)")
            if not (self._was_empty and empty):
                raise self._fail(
                    f"output {target} appeared while this run was writing it (created by another "
                    "program or run): left as it is; use --force to replace it"
                )
        holder = folder_in_use(target)
        if holder is not None:
            raise self._fail(
                f"output {target} is in use by a running bidirlm process (pid "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')}): not replacing it"
            )

    def __enter__(self) -> Path:
        target = self.target
        try:
            check_output(target, inputs=self.inputs)
        except OutputError as exc:
            raise self._fail(str(exc)) from None
        self._check_target("start")
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(sigterm_cleans_up())
        try:
            missing = []
            for parent in [target.parent, *target.parent.parents]:
                if parent.exists():
                    break
                missing.append(parent)
            for parent in reversed(missing):
                parent.mkdir()
                self._made_parents.insert(0, parent)
            lock = OutputLock(
                target.parent,
                name=f".{target.name}{PUBLISH_LOCK_SUFFIX}",
                subject=target,
            )
            try:
                lock.acquire()
            except OutputError as exc:
                raise self._fail(str(exc)) from None
            self._lock = lock
            self._check_target("start")  # (another run may have published before our lock)
            remove_stale_temporaries(target.parent)
            self.tmp = _temp_name(target, "tmp")
            self.tmp.mkdir()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.tmp

    def commit(self) -> None:
        """fsync the folder and move it into place (replacing an old output only now).

        Right before the rename the target is checked again (under the publish lock): one that
        appeared since the start is refused unless `force`, one a live run holds always."""
        assert self.tmp is not None
        _fsync_dir(self.tmp)
        self._check_target("commit")
        old = None
        if self.target.exists():
            old = _temp_name(self.target, "old")
            os.rename(self.target, old)
        try:
            os.rename(self.tmp, self.target)
        except OSError as exc:
            if old is not None:
                os.rename(old, self.target)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                # created in the instant between the check and the rename: still not replaced
                raise self._fail(
                    f"output {self.target} appeared while this run was writing it: left as it "
                    "is; use --force to replace it"
                ) from None
            raise
        except BaseException:
            if old is not None:
                os.rename(old, self.target)
            raise
        self.tmp = None
        self._made_parents = []
        _fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if self.tmp is not None:  # failed or interrupted: leave nothing behind
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            for parent in self._made_parents:
                try:
                    parent.rmdir()
                except OSError:
                    break
            self._made_parents = []
        finally:
            if self._signals is not None:
                self._signals.close()
                self._signals = None


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write one file atomically: `write(fh)` into a temporary file beside `path`, fsync, then
    `os.replace`. On any error the temporary file is removed and an `OutputError` names the path
    (an existing file is left as it was)."""
    path = Path(path)
    made: list[Path] = []
    tmp = _temp_name(path, "tmp")
    try:
        with sigterm_cleans_up():
            for parent in [path.parent, *path.parent.parents]:
                if parent.exists():
                    break
                made.append(parent)
            for parent in reversed(made):
                parent.mkdir()
            remove_stale_temporaries(path.parent)
            try:
                with open(tmp, "xb") as fh:
                    write(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                for parent in made:
                    with contextlib.suppress(OSError):
                        parent.rmdir()
                raise
    except OSError as exc:
        raise write_error(exc, path) from None
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


class OutputLock:
    """Exclusive use of an output folder by one process (`with OutputLock(folder): ...`).

    `folder/.bidirlm.lock` (or `folder/name`; errors then name `subject`, e.g. the output a
    publish lock stands for) records `{"pid", "host", "started", "command"}` and is held with
    `flock`, which the kernel releases when the process dies: a lock file left by a dead process
    on this host is taken over. A lock recorded by another host is respected (remove the file if
    that run is gone). Raises `OutputError` naming the other process, or the folder when it
    cannot be written (read-only, full).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        name: str = LOCK_NAME,
        subject: str | os.PathLike | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.subject = Path(subject) if subject is not None else self.folder
        self._fd: int | None = None
        self._made: list[Path] = []  # folders this lock created, deepest first
        self.took_over: dict[str, Any] | None = None

    def _holder(self, raw: str) -> dict[str, Any]:
        return _lock_holder(raw)

    def _busy(self, holder: dict[str, Any]) -> OutputError:
        who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
        since = holder.get("started")
        when = f" since {since}" if since else ""
        return OutputError(
            f"{self.subject} is in use by another bidirlm process ({who}{when}); wait for it, "
            f"or if it is gone remove {self.path}"
        )

    def acquire(self) -> None:
        import fcntl

        if self._fd is not None:
            raise OutputError(f"{self.folder} is already locked by this object")
        try:
            missing = []
            for folder in [self.folder, *self.folder.parents]:
                if folder.exists():
                    break
                missing.append(folder)
            for folder in reversed(missing):
                folder.mkdir()
                self._made.insert(0, folder)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                    os.close(fd)
                    raise self._busy(self._holder(raw)) from None
                except OSError as exc:
                    if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        os.close(fd)
                        raise
                    break  # no flock on this filesystem: the pid/host record below decides
                # The holder may have removed the file between our open and flock: retry on
                # the file now at the path.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            holder = self._holder(raw)
            if holder:
                pid, host = holder.get("pid"), holder.get("host")
                local = host == socket.gethostname()
                alive = isinstance(pid, int) and (pid == os.getpid() or pid_alive(pid))
                if not local or alive:  # (flock is not reliable across hosts on NFS)
                    os.close(fd)
                    raise self._busy(holder)
                self.took_over = holder  # a dead process's lock on this host
            data = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv[:3]),
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(data) + "\n").encode("utf-8"), 0)
                os.fsync(fd)
            except BaseException:  # (we hold the flock: the half-written file is ours to drop)
                with contextlib.suppress(OSError):
                    self.path.unlink()
                os.close(fd)
                raise
            self._fd = fd
        except OSError as exc:
            self._cleanup_folder()
            raise write_error(exc, self.subject) from None
        except BaseException:
            self._cleanup_folder()
            raise

    def _cleanup_folder(self) -> None:
        for folder in self._made:  # only the ones we created, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding the flock (see the inode check above)
        os.close(self._fd)
        self._fd = None
        self._cleanup_folder()  # only folders we created that are still empty

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.release()


@contextlib.contextmanager
def lock_output(folder: str | os.PathLike, *, enabled: bool = True) -> Iterator[OutputLock | None]:
    """`with lock_output(output):` one process per output folder (no-op when not `enabled`, e.g.
    on ranks other than 0 of a distributed run)."""
    if not enabled:
        yield None
        return
    with OutputLock(folder) as lock:
        if lock.took_over:
            print(
                f"bidirlm: took over the stale lock of pid {lock.took_over.get('pid')} "
                f"(no longer running) in {folder}",
                file=sys.stderr,
            )
        yield lock
