"""Peak resident-memory growth of one call on CPU, for the benchmark scripts' subprocesses.

torch's CPU allocations are invisible to tracemalloc; the kernel's high-water mark (VmHWM) is
reset just before the call so that import-time peaks do not hide the call's own. Run the
measuring process with MALLOC_MMAP_THRESHOLD_=65536 (see ``CHILD_ENV``) so that glibc returns
every large block on free and resident memory follows the live tensors.
"""

import os
import resource

CHILD_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def peak_growth(fn):
    """(peak bytes above the resident size before the call, fn's result)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        out = fn()
        after = _status_kib("VmHWM")
    except OSError:  # no /proc: ru_maxrss cannot be reset, so this is only an upper bound
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(0, after - before) * 1024, out
