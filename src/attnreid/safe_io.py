"""Files written so that nothing is lost, and files read so that nothing explodes.

Every file attnreid writes goes through here or follows the same rules (docs/reliability.md):

- **Atomic writes** (:func:`atomic_path`, :func:`atomic_open`, :func:`write_text_atomic`,
  :func:`savez_atomic`): the data goes to a temporary file in the target's folder, named
  ``.<name>.<pid>.<random>.tmp`` so that two processes never share one, is fsynced and
  renamed over the target. A crash, a full disk or Ctrl-C leaves the old file or the new
  one, never half of one. :func:`remove_stale_temps` deletes the temporary files of writes
  whose process died (only names of that pattern, only when that process is gone).
- **Writes that finish** (:func:`deferred_signals`): SIGINT and SIGTERM that arrive while a
  checkpoint is written are held until the write is done, then delivered.
- **Folder locks** (:class:`FolderLock`): one process at a time writes a run folder or an
  index. It is ``fcntl.flock`` on ``<folder>/.attnreid.lock``: the kernel drops the lock
  when its process ends, however it ends, so a killed run never blocks the next one.
- **Bounded reads** (:func:`load_npz`, :func:`check_zip_members`): before an ``.npz`` array
  or a zip member is read, its declared size is checked against its stored size and against
  the bounds below; a file over a bound is one line naming the file, the key and the bound.

No torch here: config, data and evaluation code use it too.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import secrets
import signal
import socket
import stat
import threading
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Dict, Iterable, Iterator, List, Optional, Sequence

import yaml

from attnreid.errors import AttnReidError, DataError

LOCK_NAME = ".attnreid.lock"
# .<name>.<pid>.<8 hex>.tmp[.ext]; older versions wrote .<name>.<pid>.tmp[.ext] (checkpoints, eval files)
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)(?:\.[0-9a-f]{8})?\.tmp(?:\.[A-Za-z0-9]+)?$")

# A member of a zip (an .npz array, an image in a data set zip, a checkpoint's storage) may
# expand to at most this many times its stored size once it is over EXPANSION_FLOOR bytes:
# stored or float data expands about 1x, a decompression bomb 1000x.
MAX_EXPANSION = 100
EXPANSION_FLOOR = 64 << 20
MAX_NPY_HEADER = 10_000  # numpy's own default bound on an .npy header
MAX_YAML_VALUES = 100_000  # values a YAML document may hold once its aliases are expanded
def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """A matplotlib figure's ``savefig`` to ``path`` atomically, in the format its suffix names."""
    path = Path(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".").lower() or "png", **kwargs)
    return path


MAX_YAML_DEPTH = 32  # nesting of mappings and lists (a config has 3 levels)


# -- atomic writes -----------------------------------------------------------------------

def temp_path(path: str | Path, suffix: str = "") -> Path:
    """A temporary name next to ``path`` that no other process or write uses."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of attnreid's temporary file names (see :func:`temp_path`)."""
    return _TEMP_RE.match(name) is not None


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (some file systems cannot; the rename is done anyway)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_replaceable(path: Path) -> None:
    """One line when ``path`` exists and is not a regular file (a folder, a FIFO, a device such
    as /dev/null): a rename would put a file in its place. A symlink is replaced by the new
    file; what it pointed to is left alone."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AttnReidError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise AttnReidError(f"{path} exists and is {kind}; attnreid writes only regular files there")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path; when the block ends normally, fsync it and rename it to ``path``.

    When the block raises (anything, Ctrl-C included) the temporary file is removed and
    ``path`` is left as it was. ``suffix`` ends the temporary name (some writers need
    ``.npz`` or ``.onnx``).
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: Optional[str] = None) -> Iterator[IO[Any]]:
    """``open(path, mode)`` on a temporary file, renamed over ``path`` when the block ends normally."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def savez_atomic(path: str | Path, **arrays: Any) -> Path:
    """``numpy.savez`` to ``path`` atomically (through a file handle: savez would append ``.npz`` to a name)."""
    import numpy as np

    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return Path(path)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process, or an id no process can have
    return True


def remove_stale_temps(folders: Iterable[str | Path]) -> List[Path]:
    """Delete attnreid's temporary files (:func:`temp_path` names) left in ``folders`` by
    processes that are gone; return what was removed. Nothing else is touched."""
    removed = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            m = _TEMP_RE.match(entry.name)
            if m is None or not entry.is_file(follow_symlinks=False) or pid_alive(int(m.group("pid"))):
                continue
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


# -- signals -----------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler, a container stopping), raised where Ctrl-C would be:
    code that cleans up after Ctrl-C cleans up after SIGTERM too."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) instead of
    ending the process silently; the previous handler comes back afterwards. Main thread only."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def deferred_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM), deliver: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs, then deliver the first one that came
    (``deliver=False``: drop them, for a block that is already the answer to one).

    For writes that must finish once begun (a checkpoint): Ctrl-C pressed during the write
    (once or several times) lets it complete, then acts as usual. Outside the main thread
    (where Python cannot set handlers) the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    old = {}
    for s in signums:
        current = signal.getsignal(s)
        if current is None:  # a handler installed outside Python: leave it alone
            continue
        old[s] = signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if received and deliver:
            signal.raise_signal(received[0])


# -- folder locks ------------------------------------------------------------------------

class FolderLock:
    """One writer per folder: ``with FolderLock(folder, "output folder"): ...``.

    Taking it creates ``folder`` (and its parents). A second process (or a second lock in
    this one) asking for a held folder gets one line naming the folder and the holder. The
    kernel releases an ``flock`` when the process holding it ends, so a run killed with
    SIGKILL leaves a lock file but no lock. Where the file system has no locks (some network
    mounts), the folder is used unlocked.
    """

    def __init__(self, folder: str | Path, what: str = "output folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no locking
            return self
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise AttnReidError(f"cannot lock {self.what} {self.folder}: {self.path}: "
                                f"{exc.strerror or type(exc).__name__}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)  # no locks on this file system (ENOLCK, EOPNOTSUPP)
                return self
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise AttnReidError(f"{self.what} {self.folder} is in use by another attnreid process ({holder}; "
                                f"lock {self.path}); wait for it to finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_empty_folder(folder: str | Path) -> bool:
    """Remove ``folder`` if it is empty or holds only a lock file no process holds (what a
    command that failed before writing anything leaves); never a folder with other files."""
    folder = Path(folder)
    try:
        if [e.name for e in folder.iterdir()] == [LOCK_NAME]:
            with FolderLock(folder):  # raises if another process holds it: then it is theirs
                os.unlink(folder / LOCK_NAME)
        folder.rmdir()
        return True
    except (OSError, AttnReidError):
        return False


# -- bounded reads -----------------------------------------------------------------------

class YAMLTooLarge(yaml.YAMLError):
    """A YAML document whose aliases expand beyond MAX_YAML_VALUES values, or refer to themselves."""


def _expanded_size(node: yaml.Node, memo: dict, active: set) -> int:
    """How many values ``node`` holds once every alias is expanded (shared nodes counted each time)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise YAMLTooLarge("it holds a recursive alias (an anchor used inside itself)")
    if len(active) >= MAX_YAML_DEPTH:
        raise YAMLTooLarge(f"it nests more than {MAX_YAML_DEPTH} levels deep")
    active.add(key)
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    size = 1
    for child in children:
        size += _expanded_size(child, memo, active)
        if size > MAX_YAML_VALUES:
            raise YAMLTooLarge(f"its anchors and aliases expand to more than {MAX_YAML_VALUES} values")
    active.discard(key)
    memo[key] = size
    return size


def _bounded_single_data(self):
    """``SafeLoader.get_single_data``, refusing a document that expands without bound
    (nested anchors, 'billion laughs') before it is built."""
    node = self.get_single_node()
    if node is None:
        return None
    _expanded_size(node, {}, set())
    return self.construct_document(node)


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand beyond
    :data:`MAX_YAML_VALUES` values, that nests deeper than :data:`MAX_YAML_DEPTH`, or that
    holds a recursive alias (:class:`YAMLTooLarge`), before anything is built."""

    get_single_data = _bounded_single_data


def physical_memory() -> Optional[int]:
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_member_size(source: str, info: zipfile.ZipInfo, limit: Optional[int] = None) -> None:
    """One line when a zip member declares more than ``limit`` bytes, or expands more than
    :data:`MAX_EXPANSION` times (a decompression bomb)."""
    if limit is not None and info.file_size > limit:
        raise DataError(f"{source} is {_size(info.file_size)} uncompressed; attnreid reads at most {_size(limit)} here")
    if info.file_size > EXPANSION_FLOOR and info.file_size > MAX_EXPANSION * max(info.compress_size, 1):
        raise DataError(f"{source} expands from {_size(info.compress_size)} to {_size(info.file_size)}, more than "
                        f"{MAX_EXPANSION}x (a decompression bomb?); attnreid does not read it")


def check_zip_members(path: str | Path, zf: zipfile.ZipFile, what: str = "") -> None:
    """Every member of ``zf`` within :func:`check_member_size`, and all of them together within
    this machine's memory: checked on the declared sizes, before anything is decompressed."""
    total = 0
    for info in zf.infolist():
        check_member_size(f"{path}: member '{info.filename}'", info)
        total += info.file_size
    mem = physical_memory()
    if mem is not None and total > mem:
        raise DataError(f"{path}{what} declares {_size(total)} of data, more than this machine's memory "
                        f"({_size(mem)}); attnreid does not read it")


def _npy_header(fh: IO[bytes]):
    import numpy as np

    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh, max_header_size=MAX_NPY_HEADER)
    return np.lib.format.read_array_header_2_0(fh, max_header_size=MAX_NPY_HEADER)


MAX_JSON_BYTES = 256 << 20  # eval.json, meta.json and the like are kilobytes


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """A JSON file's value; too large, not UTF-8, invalid or nested too deep is one line
    (``json`` recurses per nesting level: a file of 100,000 '[' would otherwise end in a traceback)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise DataError(f"{what} {path} is {_size(size)}; attnreid reads at most {_size(MAX_JSON_BYTES)}")
        import json

        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else _reason(exc)
        raise DataError(f"{what} {path} cannot be read ({reason})") from None


def npz_names(path: str | Path, what: str = "") -> List[str]:
    """The array names an ``.npz`` file holds (nothing is decompressed); unreadable is one line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as zf:
            return [i.filename[:-4] if i.filename.endswith(".npy") else i.filename for i in zf.infolist()]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}{what} is not a readable .npz file ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__


def load_npz(path: str | Path, keys: Optional[Iterable[str]] = None, what: str = "") -> Dict[str, Any]:
    """The arrays of an ``.npz`` file (all, or those of ``keys`` present), read safely.

    Before any array is read: the file must be a zip of ``.npy`` members; each member's
    header must declare a plain dtype (no Python objects, which need pickle) and a shape
    whose size equals the bytes the member holds; members must pass
    :func:`check_zip_members` (no decompression bombs, no more data than the machine's
    memory). A corrupt file (bad CRC, cut off) is one line too. ``what`` adds a word on the
    file's role to the messages (e.g. ``" (index shard)"``).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    wanted = None if keys is None else set(keys)
    out: Dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            check_zip_members(path, zf, what)
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if wanted is not None and key not in wanted:
                    continue
                with zf.open(info) as fh:
                    shape, _fortran, dtype = _npy_header(fh)
                    held = info.file_size - fh.tell()
                if dtype.hasobject:
                    raise DataError(f"{path}{what}: array '{key}' holds Python objects, which need pickle; "
                                    f"attnreid reads only plain arrays")
                declared = math.prod(shape) * dtype.itemsize
                if declared != held:
                    raise DataError(f"{path}{what}: array '{key}' declares shape {tuple(shape)} of {dtype} "
                                    f"({_size(declared)}) but holds {_size(held)}; the file is corrupt")
                with zf.open(info) as fh:
                    out[key] = np.lib.format.read_array(fh, allow_pickle=False, max_header_size=MAX_NPY_HEADER)
    except AttnReidError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError, RuntimeError) as exc:
        raise DataError(f"{path}{what} is not a readable .npz file ({_reason(exc)})") from None
    return out
