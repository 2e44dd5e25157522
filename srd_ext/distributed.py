"""Whole-dataset runs: several processes and machines under ``torchrun``, resumable.

The machinery shared by ``srd-explain``, ``benchmarks/eval_table.py`` and
``examples/apop_accuracy.py``; each of them runs unchanged as one process or under

    torchrun --nproc_per_node=N SCRIPT ...                       # one machine, N processes
    torchrun --nnodes=2 --nproc_per_node=N --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:PORT --rdzv-id=JOB SCRIPT ...   # the same on each machine

- :class:`Env`: rank and world size from the environment torchrun sets (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
  ``TORCHELASTIC_RESTART_COUNT``); one process when they are absent.
- :class:`Session`: this process's part in a run, made of
  :class:`ProcessGroup` (the process group: gloo on CPU; with ``--device cuda`` NCCL for CUDA
  tensors and each rank on the GPU of its local rank, results still exchanged through gloo;
  broadcasts and gathers of Python objects, all with a timeout), :class:`Heartbeat` (each rank
  beats after every unit of work), :func:`check_shared_folder` (the output folder is one for
  all machines) and :class:`RunEnd`, the end of a run: :meth:`Session.finish` waits for the
  other ranks only while they make progress and tells every rank which ranks failed or stopped
  answering, so no rank waits in a collective for one that is gone.
- :func:`blocks` / :func:`shard`: the work is cut into blocks that do not depend on the
  number of processes (batches aligned to the first image), and rank ``r`` of ``W`` takes
  blocks ``r, r + W, r + 2W, ...`` of those still to do: disjoint, no padding duplicates.
  A block is computed the same way whichever rank takes it, so the results do not depend on
  the world size; random draws are seeded by the image (:func:`image_seed`), never the rank.
- :class:`ResumeLog`: the finished blocks of a run, on disk (``run.json``: the settings that
  decide the results; ``rank-R.jsonl``: one JSON line per finished block, appended and
  fsynced when it is done). A rerun with the same settings loads them and does only the rest,
  whatever its number of processes; a rerun with other settings is refused with the
  differences named.
- The files are written whole or not at all by :mod:`srd_ext.fileio` (``atomic_write``,
  ``write_csv``, ``save_npy``: temporary file in the same folder, fsync, rename).

Dataset-scale outputs are per-image ``.npy`` files (numpy's own format: ``np.load``,
memory-mappable, one array of any shape each, written by the rank that computed it) indexed
by a CSV table (``pandas.read_csv`` or Python's ``csv``; one row per image or per image and
method, file paths relative to the table's folder). Neither needs srd_ext to read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .fileio import atomic_write

DEFAULT_TIMEOUT = 1800.0  # seconds; torch's default for collectives
POLL = 0.2  # seconds between looks at the other ranks while waiting


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def add_timeout_argument(ap: argparse.ArgumentParser) -> None:
    """The ``--timeout SECONDS`` option of the scripts that run under torchrun (> 0)."""
    ap.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="under torchrun: how long to wait for the other processes to start, in each exchange, "
        f"and for a process that makes no progress (default {DEFAULT_TIMEOUT:.0f}; must exceed one "
        "batch's time)",
    )


class DistributedError(RuntimeError):
    """A run cannot start or finish as asked; the message says what and what to do."""


class SettingsMismatch(DistributedError):
    """An unfinished run in the output folder was made with other settings."""


# ------------------------------------------------------------------------------------ environment
def _int_env(environ, name: str, default: Optional[int] = None) -> int:
    value = environ.get(name)
    if value is None or value == "":
        if default is None:
            raise DistributedError(
                f"environment variable {name} is not set; torchrun sets it for every "
                "process (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
            )
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class Env:
    """Where this process stands among the processes torchrun started."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ=None) -> "Env":
        e = os.environ if environ is None else environ
        if not e.get("WORLD_SIZE") and not e.get("RANK"):
            return cls()
        world = _int_env(e, "WORLD_SIZE")
        rank = _int_env(e, "RANK")
        if world < 1:
            raise DistributedError(f"environment variable WORLD_SIZE={world}: must be >= 1")
        if not 0 <= rank < world:
            raise DistributedError(f"environment variable RANK={rank}: must be in 0..{world - 1} (WORLD_SIZE={world})")
        local_world = _int_env(e, "LOCAL_WORLD_SIZE", 1 if world == 1 else world)
        local_rank = _int_env(e, "LOCAL_RANK", rank if local_world == world else 0)
        if not 0 <= local_rank < max(local_world, 1):
            raise DistributedError(
                f"environment variable LOCAL_RANK={local_rank}: must be in "
                f"0..{local_world - 1} (LOCAL_WORLD_SIZE={local_world})"
            )
        if world > 1:
            for name in ("MASTER_ADDR", "MASTER_PORT"):
                if not e.get(name):
                    raise DistributedError(
                        f"WORLD_SIZE={world} but {name} is not set; start the processes "
                        "with torchrun, which sets MASTER_ADDR and MASTER_PORT"
                    )
        return cls(rank, world, local_rank, local_world, _int_env(e, "TORCHELASTIC_RESTART_COUNT", 0))


def resolve_device(device: str, env: Env) -> torch.device:
    """``cpu``, or ``cuda`` / ``cuda:N``: plain ``cuda`` is the GPU of this process's local rank
    (local ranks beyond the visible GPUs share them round-robin)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise DistributedError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"--device {device} but no CUDA device is available; use --device cpu")
        count = torch.cuda.device_count()
        if d.index is None:
            d = torch.device("cuda", env.local_rank % count)
        elif d.index >= count:
            raise DistributedError(f"--device {device}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
        torch.cuda.set_device(d)
    elif d.type != "cpu":
        raise DistributedError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    return d


# ------------------------------------------------------------------------------------ work units
@dataclass(frozen=True)
class Block:
    """Images ``start .. stop-1`` (dataset indices), computed together as one batch."""

    start: int
    stop: int

    @property
    def key(self) -> str:
        return f"{self.start}-{self.stop}"

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __str__(self) -> str:
        return f"image {self.start}" if len(self) == 1 else f"images {self.start}..{self.stop - 1}"


def blocks(n: int, size: int, start: int = 0) -> List[Block]:
    """``n`` images from ``start`` in blocks of ``size`` (the last one shorter). They depend only
    on these three numbers, never on the number of processes."""
    if size < 1:
        raise ValueError(f"block size must be >= 1, got {size}")
    return [Block(s, min(s + size, start + n)) for s in range(start, start + max(n, 0), size)]


def shard(units: Sequence, rank: int, world_size: int) -> list:
    """Rank ``rank``'s share of ``units``: every ``world_size``-th one from ``rank``. The shares
    are disjoint, cover every unit once and differ in size by at most one (nothing is padded)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    return list(units[rank::world_size])


def image_seed(seed: int, index: int) -> int:
    """A seed for the random draws of image ``index`` of a run seeded with ``seed``: the same on
    every rank and for every world size and batch size."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(index) & 0xFFFFFFFFFFFFFFFF])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


# ------------------------------------------------------------------------------------ process group
class _Ranked:
    """Who this process is, read from its :class:`Env` (``self.env``)."""

    env: "Env"

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def distributed(self) -> bool:
        return self.env.world_size > 1


class ProcessGroup(_Ranked):
    """The process group of a torchrun job (gloo on CPU; with a CUDA device NCCL for CUDA tensors,
    Python objects still exchanged through gloo), its key-value store, and the collectives on
    Python objects, each bounded by ``timeout`` seconds. In a one-process run there is no group and
    each collective returns this process's own value."""

    def __init__(self, env: Env, device: torch.device, timeout: float):
        self.env = env
        self.device = device
        self.timeout = float(timeout)
        self.store = None  # the job's store, below this run's prefix; None until started
        self._group = None  # the gloo group objects travel through
        self._started = False

    def start(self) -> bool:
        """Join the other ranks (collective). Returns whether this call set the group up: False
        in a one-process run and when it was started already."""
        if self._started or not self.distributed:
            self._started = True
            return False
        import torch.distributed as dist

        if not dist.is_available():
            raise DistributedError("this torch build has no torch.distributed; run one process")
        td = datetime.timedelta(seconds=self.timeout)
        try:
            store, rank, world = next(dist.rendezvous("env://", timeout=td))
        except Exception as e:  # the rendezvous names host and port; say what was waited for
            raise DistributedError(
                f"rank {self.rank}: could not join the other {self.world_size - 1} "
                f"process(es) within {self.timeout:.0f} s ({type(e).__name__}: {e})"
            ) from e
        if (rank, world) != (self.rank, self.world_size):
            raise DistributedError(
                f"rendezvous gave rank {rank} of {world}, the environment {self.rank} of {self.world_size}"
            )
        base = dist.PrefixStore(f"srd_ext/{self.env.restart}", store)
        backend = "gloo" if self.device.type == "cpu" else "cpu:gloo,cuda:nccl"
        dist.init_process_group(
            backend=backend, store=dist.PrefixStore("pg", base), rank=rank, world_size=world, timeout=td
        )
        self._group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=td)
        self.store = dist.PrefixStore("run", base)
        self.store.set_timeout(td)
        self._started = True
        return True

    def close(self) -> None:
        if self.distributed and self._started and self.store is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.store = None

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def share(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed on rank 0 only and handed to every rank; if it raises, every rank
        raises the same exception (so no rank is left waiting for a result that never comes)."""
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # handed to the others, raised below
                error = e
        ok, value = self.broadcast((error is None, result if error is None else error))
        if not ok:
            raise value
        return value

    def gather(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj``, in rank order, on rank 0; None on the others."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._group)
        return out


# ------------------------------------------------------------------------------------ heartbeat
class Heartbeat:
    """This rank's signs of life in the job's store: a counter it raises after every step
    (``beat/R``), what it works on (``now/R``) and the images it finished (``images/R``). The
    other ranks read them to tell a slow rank from a lost one. Without a store (one process, or
    before the start) it only remembers what this rank works on."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.store = None
        self.current = ""  # what this rank last worked on

    def attach(self, store) -> None:
        """Publish in ``store`` from now on; the first beat says the rank is starting."""
        self.store = store
        store.set(f"now/{self.rank}", "starting")
        store.add(f"beat/{self.rank}", 1)

    def detach(self) -> None:
        self.store = None

    def beat(self, current: str = "", images: int = 0) -> None:
        """Tell the others this rank is alive, working on ``current``, and has finished
        ``images`` more images."""
        if current:
            self.current = current
        if self.store is None:
            return
        if current:
            self.store.set(f"now/{self.rank}", current)
        if images:
            self.store.add(f"images/{self.rank}", int(images))
        self.store.add(f"beat/{self.rank}", 1)

    def images_done(self) -> Optional[int]:
        """Images finished by all ranks together in this run (None without a store)."""
        if self.store is None:
            return None
        return sum(int(self.store.add(f"images/{r}", 0)) for r in range(self.world_size))


# ------------------------------------------------------------------------------------ shared folder
def check_shared_folder(group: ProcessGroup, folder: str, host: str, settle: float = 10.0) -> None:
    """Collective. Make sure every rank sees the files rank 0 writes in ``folder`` (several
    machines need a shared file system for one output tree and for resuming): rank 0 writes a
    probe file, every rank looks for it for up to ``settle`` seconds (the time a network file
    system is given to show a new file), and all learn who could not see it."""
    if not group.distributed:
        return
    name = None
    if group.is_main:
        os.makedirs(folder, exist_ok=True)
        name = f".srd-ext-shared-{uuid.uuid4().hex}"
        atomic_write(os.path.join(folder, name), host)
    name = group.broadcast(name)
    path = os.path.join(folder, name)
    deadline = time.monotonic() + settle
    seen = os.path.exists(path)
    while not seen and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = os.path.exists(path)
    answers = group.all_gather((group.rank, host, seen))
    if group.is_main:
        os.unlink(path)
    missing = [f"rank {r} on {h}" for r, h, s in answers if not s]
    if missing:
        raise DistributedError(
            f"{folder} is not shared between the machines: {', '.join(missing)} cannot see a file rank 0 "
            f"on {host} wrote there. Runs on several machines need the output folder on a file "
            "system all of them mount (NFS, Lustre, ...)."
        )


# ------------------------------------------------------------------------------------ end of a run
class RunEnd:
    """The end of a run, agreed through the job's store without any collective, so that a lost
    rank cannot make the others hang. Every rank posts its status (``done/R``); rank 0 referees:
    it waits while each rank either finished or keeps beating within ``timeout`` seconds, then
    posts the verdict (every rank's status) that all ranks return."""

    def __init__(self, store, rank: int, world_size: int, timeout: float):
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout

    def agree(self, me: dict, on_wait: Optional[Callable[[], None]] = None) -> List[dict]:
        """Post this rank's status ``me``; every rank's status, the same list on every rank."""
        st = self.store
        try:
            st.set(f"done/{self.rank}", json.dumps(me))
            if self.rank == 0:
                verdict = self._referee(on_wait)
                st.set("verdict", json.dumps(verdict))
                self._await_acks(verdict)
            else:
                verdict = self._await_verdict(on_wait)
                st.set(f"ack/{self.rank}", "1")
        except DistributedError:
            raise
        except Exception as e:  # the store went away with rank 0's process (runs not started by torchrun)
            raise DistributedError(
                f"rank {self.rank}: lost the connection to the other ranks ({type(e).__name__}: {e})"
            ) from e
        return verdict

    def _wait(self, on_wait) -> None:
        """Between two looks at the others: a beat of this rank, the caller's refresh, a pause."""
        self.store.add(f"beat/{self.rank}", 1)
        if on_wait is not None:
            on_wait()
        time.sleep(POLL)

    def _referee(self, on_wait) -> List[dict]:
        st, n = self.store, self.world_size
        last = {r: (-1, time.monotonic()) for r in range(n)}
        statuses: Dict[int, dict] = {}
        while True:
            for r in range(n):
                if r not in statuses and st.check([f"done/{r}"]):
                    statuses[r] = json.loads(st.get(f"done/{r}"))
            if len(statuses) == n:
                return [statuses[r] for r in range(n)]
            now = time.monotonic()
            lost = []
            for r in range(n):
                if r in statuses:
                    continue
                beats = int(st.add(f"beat/{r}", 0))
                if beats != last[r][0]:
                    last[r] = (beats, now)
                elif now - last[r][1] > self.timeout:
                    lost.append(r)
            if lost:
                return self._give_up(statuses, lost)
            self._wait(on_wait)

    def _give_up(self, statuses: Dict[int, dict], lost: List[int]) -> List[dict]:
        """The verdict when the ranks ``lost`` stopped answering: those are reported with what they
        last worked on; the others that have not finished yet are given their status as it is now."""
        st = self.store
        for r in lost:
            current = st.get(f"now/{r}").decode() if st.check([f"now/{r}"]) else "?"
            statuses[r] = {
                "rank": r,
                "host": "?",
                "ok": False,
                "current": current,
                "error": f"stopped answering: no progress for {self.timeout:.0f} s (--timeout)",
            }
        for r in range(self.world_size):
            if r not in statuses:
                statuses[r] = {
                    "rank": r,
                    "host": "?",
                    "ok": False,
                    "current": "",
                    "error": "still working when the run was given up",
                }
        return [statuses[r] for r in range(self.world_size)]

    def _await_acks(self, verdict: List[dict], limit: float = 10.0) -> None:
        """Rank 0 may host the store (runs not started by torchrun): it stays until the ranks that
        finished have read the verdict, so that they do not lose the connection first."""
        waiting = [f"ack/{s['rank']}" for s in verdict if s["rank"] != 0 and "host" in s and s["host"] != "?"]
        deadline = time.monotonic() + min(limit, self.timeout)
        while waiting and time.monotonic() < deadline:
            waiting = [k for k in waiting if not self.store.check([k])]
            if waiting:
                time.sleep(POLL / 4)

    def _await_verdict(self, on_wait) -> List[dict]:
        st = self.store
        last, since = -1, time.monotonic()
        while not st.check(["verdict"]):
            beats = int(st.add("beat/0", 0))
            now = time.monotonic()
            if beats != last:
                last, since = beats, now
            elif now - since > self.timeout:
                raise DistributedError(
                    f"rank {self.rank}: rank 0 stopped answering (no progress for "
                    f"{self.timeout:.0f} s, --timeout); its finished work is on disk"
                )
            self._wait(on_wait)
        return json.loads(st.get("verdict"))


# ------------------------------------------------------------------------------------ session
class Session(_Ranked):
    """This process's part in a run: one process, or one rank of a torchrun job.

    ``timeout`` (seconds) bounds the start (all ranks joining), every collective, and how long a
    rank may go without progress before the others give up on it. Made of the parts above: the
    :class:`ProcessGroup` and its collectives (``group``), this rank's :class:`Heartbeat`
    (``heartbeat``), :func:`check_shared_folder` and the :class:`RunEnd`.
    """

    def __init__(self, device: str = "cpu", timeout: float = DEFAULT_TIMEOUT, env: Optional[Env] = None):
        if not timeout > 0:
            raise DistributedError(f"--timeout must be > 0 seconds, got {timeout}")
        self.env = env if env is not None else Env.from_environ()
        self.timeout = float(timeout)
        self.device = resolve_device(device, self.env)
        self.host = socket.gethostname()
        self.group = ProcessGroup(self.env, self.device, self.timeout)
        self.heartbeat = Heartbeat(self.env.rank, self.env.world_size)

    @property
    def store(self):
        """The job's key-value store (None in a one-process run or before the start)."""
        return self.group.store

    def __enter__(self) -> "Session":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self.group.start():
            self.heartbeat.attach(self.group.store)

    def close(self) -> None:
        self.group.close()
        self.heartbeat.detach()

    # -- collectives (each bounded by the timeout)
    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return self.group.broadcast(obj)

    def share(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed on rank 0 only and handed to every rank (:meth:`ProcessGroup.share`)."""
        return self.group.share(fn)

    def gather(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj``, in rank order, on rank 0; None on the others."""
        return self.group.gather(obj)

    def all_gather(self, obj: Any) -> List[Any]:
        return self.group.all_gather(obj)

    # -- progress and liveness
    def beat(self, current: str = "", images: int = 0) -> None:
        """Tell the others this rank is alive, working on ``current``, and has finished
        ``images`` more images."""
        self.heartbeat.beat(current, images)

    def images_done(self) -> Optional[int]:
        """Images finished by all ranks together in this run (None in a one-process run)."""
        return self.heartbeat.images_done()

    def check_shared_folder(self, folder: str, settle: float = 10.0) -> None:
        """Make sure every rank sees the files rank 0 writes in ``folder`` (:func:`check_shared_folder`)."""
        check_shared_folder(self.group, folder, self.host, settle)

    def finish(self, error: Optional[str] = None, on_wait: Optional[Callable[[], None]] = None) -> List[dict]:
        """End of this rank's share of the work; ``error`` says why it stopped early (None: done).

        Waits for the other ranks as long as each either finished or made progress within the
        timeout, then returns every rank's status, the same list on every rank: dicts with
        ``rank``, ``host``, ``ok``, ``error`` and ``current`` (what it last worked on). A rank
        that stopped answering is reported as such. Nothing here waits in a collective, so a
        lost rank cannot make the others hang; call :meth:`gather` only when all are ``ok``.
        """
        me = {
            "rank": self.rank,
            "host": self.host,
            "ok": error is None,
            "error": error or "",
            "current": self.heartbeat.current,
        }
        if not self.distributed:
            return [me]
        return RunEnd(self.store, self.rank, self.world_size, self.timeout).agree(me, on_wait)


def failures(statuses: List[dict]) -> List[str]:
    """One line per rank that did not finish its share."""
    out = []
    for s in statuses:
        if not s["ok"]:
            where = f" (on {s['host']})" if s.get("host") not in (None, "?") else ""
            at = f", last working on {s['current']}" if s.get("current") and s["current"] not in s["error"] else ""
            out.append(f"rank {s['rank']}{where}: {s['error']}{at}")
    return out


def run_in_session(prog: str, device: str, timeout: float, fn: Callable[["Session"], Any]) -> Any:
    """``fn(session)`` inside a :class:`Session` (the main of a dataset script). A
    :class:`DistributedError` ends the program with its message: status 2 for a
    :class:`SettingsMismatch` (a usage error), 1 otherwise."""
    try:
        with Session(device, timeout) as session:
            return fn(session)
    except DistributedError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, SettingsMismatch) else 1) from None


def run_share(
    session: "Session",
    todo: Sequence["Block"],
    work: Callable[["Block"], Any],
    log: Optional["ResumeLog"],
    progress: "Progress",
    prog: str,
    describe: Callable[["Block"], str] = str,
    count: Optional[Callable[["Block"], int]] = len,
):
    """This rank's share of the blocks ``todo``: ``work(block)`` returns the block's record, which
    goes into ``log`` as soon as the block is done (``log`` None: ``work`` records what it needs
    itself). After each block the progress advances by ``count(block)`` images (None: ``work``
    advances it itself). A failure ends the share; its message, naming the block by
    ``describe(block)``, and traceback are printed (``prog``: the program's name) and returned.
    Returns (records by block key, error or None); the log is closed either way."""
    import traceback

    new: Dict[str, Any] = {}
    error, block = None, None
    try:
        for block in shard(todo, session.rank, session.world_size):
            progress.working_on(describe(block))
            rec = work(block)
            if log is not None:
                log.add(block.key, rec)
            new[block.key] = rec
            if count is not None:
                progress.update(count(block))
    except Exception as e:
        where = describe(block) if block is not None else "its start"
        error = f"failed on {where} ({type(e).__name__}: {e})"
        progress.write(f"{prog}: rank {session.rank}: {error}\n{traceback.format_exc()}")
    if log is not None:
        log.close()
    return new, error


def finish_run(session: "Session", error: Optional[str], progress: "Progress", prog: str, kept: str) -> bool:
    """The end of a run on every rank: waits for the others (:meth:`Session.finish`) and closes the
    progress bar. When a rank did not finish its share, rank 0 prints which, what is ``kept``, and
    that the same command does the rest. Returns whether every rank finished."""
    statuses = session.finish(error, on_wait=progress.refresh)
    progress.close()
    lost = failures(statuses)
    if lost and session.is_main:
        print(
            f"{prog}: the run did not finish:\n  " + "\n  ".join(lost) + f"\n{kept}; run the same command "
            "again to do the rest.",
            file=sys.stderr,
        )
    return not lost


class Progress:
    """A progress bar on rank 0 only, counting the images of all ranks."""

    def __init__(
        self,
        session: Session,
        total: int,
        desc: str,
        unit: str = "img",
        disable: bool = False,
        file=None,
        **tqdm_options,
    ):
        self.session = session
        self.bar = None
        self.count = 0
        if session.is_main and not disable:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=file or sys.stderr, **tqdm_options)

    def working_on(self, current: str, name: Optional[str] = None) -> None:
        self.session.beat(current)
        if self.bar is not None and name is not None:
            self.bar.set_postfix_str(name)

    def update(self, n: int) -> None:
        self.session.beat(images=n)
        self.count += n
        self.refresh()

    def refresh(self) -> None:
        if self.bar is None:
            return
        total = self.session.images_done()
        self.bar.n = self.count if total is None else total
        self.bar.refresh()

    def write(self, message: str, file=None) -> None:
        """A message on this rank's stderr that does not break rank 0's bar."""
        if self.bar is not None:
            self.bar.write(message, file=file or sys.stderr)
        else:
            print(message, file=file or sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.refresh()
            self.bar.close()


# ------------------------------------------------------------------------------------ resume log
def _normalized(settings: Dict[str, Any]) -> Dict[str, Any]:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


class ResumeLog:
    """The finished units of one run, kept on disk in ``folder`` so that a stopped run resumes.

    ``folder/run.json`` holds ``settings`` (what decides the results); ``folder/rank-R.jsonl``
    one line ``{"key": ..., "record": ...}`` per unit finished by rank R, flushed and fsynced as
    soon as the unit is done. :meth:`open` (collective) returns the records of earlier runs;
    every rank then appends to its own file. :meth:`remove` deletes these files (and the folder
    if that leaves it empty) once the final outputs are written.
    """

    SETTINGS = "run.json"

    def __init__(self, folder: str, settings: Dict[str, Any], session: Session, what: str = "run"):
        self.folder = folder
        self.settings = _normalized(settings)
        self.session = session
        self.what = what
        self._file = None

    def _read(self) -> Dict[str, Any]:
        """Rank 0: check or create run.json; the records found in the rank files."""
        path = os.path.join(self.folder, self.SETTINGS)
        if os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except (OSError, ValueError) as e:
                raise DistributedError(f"{path} is unreadable ({e}); delete {self.folder} to start over") from None
            if old != self.settings:
                diff = [
                    f"{k}: {old.get(k)!r} then, {self.settings.get(k)!r} now"
                    for k in sorted(set(old) | set(self.settings))
                    if old.get(k) != self.settings.get(k)
                ]
                raise SettingsMismatch(
                    f"{self.folder} holds an unfinished {self.what} with other settings ({'; '.join(diff)}). "
                    f"Rerun with the earlier settings to finish it, or delete {self.folder} to start over."
                )
        else:
            atomic_write(path, json.dumps(self.settings, indent=1, sort_keys=True) + "\n")
        records: Dict[str, Any] = {}
        for name in sorted(os.listdir(self.folder)):
            if not (name.startswith("rank-") and name.endswith(".jsonl")):
                continue
            with open(os.path.join(self.folder, name), "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        continue  # the torn last line of a killed process
                    try:
                        entry = json.loads(line)
                        records[entry["key"]] = entry["record"]
                    except (ValueError, KeyError, TypeError):
                        continue
        return records

    def open(self) -> Dict[str, Any]:
        """Collective. The records (key -> record) finished by earlier runs, on every rank."""
        self.session.check_shared_folder(self.folder)
        records = self.session.share(self._read)
        path = os.path.join(self.folder, f"rank-{self.session.rank}.jsonl")
        self._file = open(path, "ab")
        if self._file.tell() > 0:  # after a torn line, start a fresh one
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write(b"\n")
        return records

    def add(self, key: str, record: Any) -> None:
        """Record a finished unit, durably, before moving on."""
        self._file.write((json.dumps({"key": key, "record": record}, separators=(",", ":")) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """Rank 0, after the final outputs are written: delete this run's files."""
        self.close()
        if not os.path.isdir(self.folder):
            return
        for name in os.listdir(self.folder):
            if name == self.SETTINGS or (name.startswith("rank-") and name.endswith(".jsonl")):
                os.unlink(os.path.join(self.folder, name))
        try:
            os.rmdir(self.folder)
        except OSError:
            pass  # something else is in there: leave it


def rename_hint(argv: Optional[Sequence[str]], renamed: Dict[str, str]) -> Optional[str]:
    """A message for options that were renamed because torchrun reads them as its own."""
    for a in sys.argv[1:] if argv is None else argv:
        name = a.split("=", 1)[0]
        if name in renamed:
            return (
                f"{name} is now {renamed[name]} (under torchrun, {name} is taken as an abbreviation of "
                f"one of torchrun's own options)"
            )
    return None
