"""Small filesystem utilities shared by runs, the feature cache and sweeps.

* Atomic writes: the content goes to a temporary file in the destination's folder, is flushed and
  ``fsync``-ed, then ``os.replace``-d over the destination. A reader (or a crash) sees either the
  old file or the new one, never half of one, and a failed write leaves no temporary file behind.
  The temporary file lives in the same folder because ``os.replace`` is only atomic within one
  file system. A replaced file keeps its permission bits; a new one gets the usual
  ``0o666 & ~umask`` (a bare temporary file would be ``0o600``, unreadable by a shared team).
* Locked appends for the ``results.jsonl`` index that concurrent sweep workers write to, and a
  reader that tolerates the torn last line a killed writer can leave.
* SHA-256 helpers for content-addressed cache keys and run ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import torch

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "bytes_sha256",
    "file_sha256",
    "json_fingerprint",
    "locked_append_line",
    "read_jsonl",
    "short_hash",
]


# --------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask can only set)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Fallback: set-and-restore. Briefly process-wide, but only reached where /proc is missing.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on directories; the data itself was synced
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Create a temp file beside ``path``, let ``write(tmp_path)`` fill it, fsync it, then replace.

    ``write`` gets a file name rather than a handle because some writers (safetensors) only take
    names. Whatever goes wrong, including KeyboardInterrupt, the temp file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = _target_mode(target)
    handle = tempfile.NamedTemporaryFile(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
    )
    tmp = Path(handle.name)
    try:
        handle.close()
        write(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created). Returns the path."""
    return _atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded as ``encoding``; newlines are written as given."""
    # Encode before the temp file exists: an unencodable character then costs no I/O at all.
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (keys in insertion order, a trailing newline) to ``path`` atomically.

    ``NaN`` and infinities are written as the bare tokens ``NaN``/``Infinity`` (Python's ``json``
    reads them back; strict parsers do not). Non-ASCII text is written as UTF-8, not escaped.
    If ``obj`` cannot be serialised, ``TypeError``/``ValueError`` is raised and ``path`` is untouched.
    """
    text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=True, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def atomic_save_safetensors(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Save ``tensors`` as a safetensors file at ``path`` atomically.

    Tensors are detached, moved to CPU and made contiguous first (safetensors requires both).
    ``metadata`` values must be strings (a format restriction). Tensors that share storage are
    rejected by safetensors; pass clones if that is intended.
    """
    from safetensors.torch import save_file

    prepared = {str(k): v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = None if metadata is None else {str(k): v for k, v in metadata.items()}
    if meta is not None:
        bad = [k for k, v in meta.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be str; not str for keys {bad}")
    return _atomic_write(path, lambda tmp: save_file(prepared, str(tmp), metadata=meta))


# --------------------------------------------------------------------------- append-only logs


def locked_append_line(path: PathLike, line: str, timeout: float = -1) -> None:
    """Append ``line`` plus ``"\\n"`` to ``path`` while holding an exclusive ``path + ".lock"`` lock.

    Concurrent writers (processes or threads) never interleave their lines. ``line`` must not
    contain a newline: one call is one record. ``timeout`` (seconds, ``-1`` = wait forever) is
    passed to :class:`filelock.FileLock`, which raises ``filelock.Timeout`` when it runs out.
    The ``.lock`` file is left in place (removing it would race with the next waiter).
    """
    from filelock import FileLock

    if "\n" in line or "\r" in line:
        raise ValueError("locked_append_line writes one record per call; the line contains a newline")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = (line + "\n").encode("utf-8")
    with FileLock(str(target) + ".lock", timeout=timeout):
        # Append mode + one write under the lock: the record lands whole at the current end.
        with open(target, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def read_jsonl(path: PathLike) -> list[Any]:
    """Read a JSON-lines file; blank lines are skipped.

    A last line that does not parse is taken to be the torn end of an interrupted append: it is
    skipped with a logged warning. A bad line anywhere else means real corruption and raises
    ``ValueError`` naming the line number.
    """
    target = Path(path)
    with open(target, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    numbered = [(i + 1, text) for i, text in enumerate(lines) if text.strip()]
    records: list[Any] = []
    for position, (lineno, text) in enumerate(numbered):
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError as err:
            if position == len(numbered) - 1:
                log.warning("%s: skipping truncated last line %d (%s)", target, lineno, err)
                break
            raise ValueError(f"{target}: line {lineno} is not valid JSON ({err})") from err
    return records


# --------------------------------------------------------------------------- hashing


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte pieces (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def bytes_sha256(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def json_fingerprint(obj: Any) -> str:
    """Hex SHA-256 of the canonical JSON of ``obj`` (sorted keys, no spaces), for cache keys and run ids.

    Dict key order does not matter; list order does. Tuples hash like lists. Objects JSON cannot
    encode (paths, tensors, sets) raise ``TypeError`` rather than being hashed through a ``repr``
    that could change between versions: convert them explicitly.
    """
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def short_hash(s: str | bytes, n: int = 12) -> str:
    """First ``n`` hex digits of the SHA-256 of ``s`` (str is UTF-8 encoded); ``1 <= n <= 64``."""
    if not 1 <= n <= 64:
        raise ValueError(f"n must be between 1 and 64 hex digits, got {n}")
    data = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return hashlib.sha256(data).hexdigest()[:n]
