"""Run the repository's scripts (benchmarks/, examples/) as a user does: as programs, in a subprocess."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(relpath: str, *args, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``python <relpath> <args>`` from the repository root; stdout and stderr captured as text.
    With ``check`` a failure raises an AssertionError that shows both."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / relpath), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{relpath} exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc
