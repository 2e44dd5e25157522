"""Which implementation of the srd_ext operators runs: the compiled kernels or the composite path.

``SRD_EXT_BACKEND`` (read at import) or :func:`set_backend` / :func:`use_backend`:

- ``auto`` (default): the compiled CPU kernels on the CPU; on CUDA, the compiled CUDA kernels
  only once a GPU run of ``make gpu-check`` has passed for them (:func:`gpu_record`), the
  composite path until then and wherever the extension was built without CUDA; the composite path
  on every other device (MPS, XPU, ...).
- ``kernels``: the compiled kernels wherever they were built (CUDA too, passed or not); devices
  without one still run the composite path.
- ``composite``: the composite path (``srd_ext.composite``, ATen ops only) everywhere.

"Passed" is known from ``srd_ext/gpu_record.json``, written by ``make gpu-check``
(benchmarks/gpu_check.py): the GPU, the torch version, the commit and a digest of ``csrc/``, the
test and comparison results, and ``passed``. The record counts only while ``csrc/`` is what was
checked: where the sources are present (a checkout or an editable install) their digest must match
the record's. Committing a passing record is what makes ``auto`` use the CUDA kernels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

__all__ = [
    "BACKENDS",
    "get_backend",
    "set_backend",
    "use_backend",
    "uses_kernels",
    "path_for",
    "gpu_record",
    "gpu_record_passed",
    "csrc_digest",
    "RECORD_PATH",
]

BACKENDS = ("auto", "kernels", "composite")
RECORD_PATH = Path(__file__).with_name("gpu_record.json")
_CSRC = Path(__file__).resolve().parent.parent / "csrc"


def _parse(name: Optional[str], where: str) -> str:
    value = (name or "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{where} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return value


_backend = _parse(os.environ.get("SRD_EXT_BACKEND"), "SRD_EXT_BACKEND")


def get_backend() -> str:
    """The backend setting: ``auto``, ``kernels`` or ``composite``."""
    return _backend


def set_backend(name: str) -> str:
    """Sets the backend (``auto`` | ``kernels`` | ``composite``) for this process; returns the
    previous one. Functions compiled with ``torch.compile`` recompile on a change."""
    global _backend
    previous, _backend = _backend, _parse(name, "srd_ext backend")
    return previous


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend("composite"): ...`` runs the block on that backend."""
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def csrc_digest(root: Optional[Path] = None) -> Optional[str]:
    """sha256 of the kernel sources (paths and contents of csrc/), or None where they are absent."""
    root = Path(root) if root is not None else _CSRC
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def gpu_record() -> dict:
    """The record of the last GPU run of ``make gpu-check`` (srd_ext/gpu_record.json), ``{}`` if
    there is none."""
    try:
        return json.loads(RECORD_PATH.read_text())
    except (OSError, ValueError):
        return {}


def _record_passes(record: dict, digest: Optional[str]) -> bool:
    if not record.get("passed"):
        return False
    return digest is None or record.get("csrc_digest") == digest


def gpu_record_passed() -> bool:
    """Whether a GPU run of ``make gpu-check`` has passed for these CUDA kernels."""
    record = gpu_record()
    return _record_passes(record, csrc_digest() if record.get("passed") else None)


_HAS_KERNELS = {"cpu": False, "cuda": False}
_CUDA_PASSED = False


def _init(cpu_kernels: bool, cuda_kernels: bool) -> None:
    """Called once by srd_ext.ops with what the compiled extension holds."""
    global _CUDA_PASSED
    _HAS_KERNELS["cpu"], _HAS_KERNELS["cuda"] = cpu_kernels, cuda_kernels
    _CUDA_PASSED = cuda_kernels and gpu_record_passed()


def uses_kernels(device) -> bool:
    """Whether the srd_ext wrappers run the compiled kernels on ``device`` (a torch.device, a
    device string or a device type) under the current setting."""
    kind = device if isinstance(device, str) else device.type
    kind = kind.split(":")[0]
    if _backend == "composite" or not _HAS_KERNELS.get(kind, False):
        return False
    if kind == "cuda" and _backend == "auto":
        return _CUDA_PASSED
    return True


def path_for(device) -> str:
    """``"kernels"`` or ``"composite"``: the path the wrappers take on ``device``."""
    return "kernels" if uses_kernels(device) else "composite"
