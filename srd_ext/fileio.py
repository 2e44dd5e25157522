"""Whole files or none: the file writing shared by ``srd-explain``, :mod:`srd_ext.distributed`
and the benchmarks.

Every write goes to a temporary file in the destination's folder (``.NAME.XXXXXXXX.tmp``),
is fsynced, and is then renamed into place, so an interrupted run leaves the old file or the
new one, never part of one (:func:`atomic_write`, :class:`Staged` for several files that go in
place together). A process killed while writing leaves its temporary file behind;
:func:`remove_stale_temporaries` deletes those before a new run writes there.

Tables are CSV files (:func:`csv_text`, :func:`write_csv`: ``pandas.read_csv`` or Python's
``csv`` read them) and arrays ``.npy`` files (:func:`npy_bytes`, :func:`save_npy`: ``np.load``
reads them); neither needs srd_ext to read.

A leaf module: it imports nothing from srd_ext.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

Data = Union[bytes, str]  # str is written as UTF-8


def _file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give a new file (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _write_temporary(path: str, data: Data, mode: Optional[int] = None) -> str:
    """``data`` written in full, fsynced, to a new temporary file next to ``path`` (its folder is
    created if missing), with the permissions ``mode`` (default: those ``open(path, "w")`` gives).
    Returns the temporary file's path; on failure nothing is left."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode() if mode is None else mode)
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def _put_in_place(tmp: str, path: str, overwrite: bool = True) -> None:
    """Rename the written temporary file ``tmp`` to ``path``. Without ``overwrite`` it goes in
    place with a hard link, which fails (FileExistsError) if ``path`` exists: a file that
    appeared since the run was planned is not replaced."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if path appeared meanwhile
    except FileExistsError:
        raise FileExistsError(f"{path} appeared during the run; not replaced") from None
    except OSError:  # no hard links on this file system
        if os.path.lexists(path):
            raise FileExistsError(f"{path} appeared during the run; not replaced") from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


def atomic_write(path: str, data: Data, overwrite: bool = True) -> None:
    """Write ``data`` (bytes or str) to ``path`` as a whole: a temporary file in the same folder,
    fsynced, then renamed over ``path``. An interrupted write leaves the old file or none.
    Without ``overwrite`` an existing ``path`` is left as it is (FileExistsError)."""
    tmp = _write_temporary(path, data)
    try:
        _put_in_place(tmp, path, overwrite)
    except BaseException:
        _discard(tmp)
        raise


class Staged:
    """Files written in full to temporary names next to their destinations, and renamed into
    place only once all of them are written: an interrupted run leaves whole files, never part
    of one. Without ``overwrite`` a file is put in place with a hard link, which fails if the
    destination appeared since the run was planned."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.pending: List[Tuple[str, str]] = []
        self.mode = _file_mode()

    def add(self, path: str, data: Data) -> None:
        self.pending.append((_write_temporary(path, data, self.mode), path))

    def commit(self) -> None:
        for tmp, path in self.pending:
            _put_in_place(tmp, path, self.overwrite)
        self.pending = []

    def discard(self) -> None:
        for tmp, _ in self.pending:
            _discard(tmp)
        self.pending = []


def temporary_target(name: str) -> Optional[str]:
    """The file a temporary file of :func:`atomic_write` (``.NAME.XXXXXXXX.tmp``) was for, or None."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    parts = name[1:].rsplit(".", 2)
    return parts[0] if len(parts) == 3 and parts[0] else None


def remove_stale_temporaries(folder: str, targets: Optional[Iterable[str]] = None) -> List[str]:
    """Delete the temporary files a killed process left in ``folder`` while writing the files
    named in ``targets`` (all of them if None). Call it before this run writes there."""
    wanted = None if targets is None else set(targets)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        target = temporary_target(name)
        if target is not None and (wanted is None or target in wanted):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def npy_bytes(array) -> bytes:
    """``array`` in numpy's ``.npy`` format (what ``np.save`` writes)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def save_npy(path: str, array) -> None:
    """``array`` as a ``.npy`` file (``np.load`` reads it), written atomically."""
    atomic_write(path, npy_bytes(array))


def csv_text(rows: Iterable[Dict[str, Any]], fields: Sequence[str]) -> str:
    """A CSV table with a header row; missing values (None) are empty cells."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n", extrasaction="raise")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in fields})
    return buf.getvalue()


def write_csv(path: str, rows: Iterable[Dict[str, Any]], fields: Sequence[str]) -> None:
    """A CSV table with a header row (``pandas.read_csv``, ``csv.DictReader``), written atomically;
    missing values are empty cells."""
    atomic_write(path, csv_text(rows, fields))
