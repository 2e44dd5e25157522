"""srd_ext.distributed: the pieces (environment, blocks and shards, seeds, files, resume log, the
end of a run with two ranks, one of them failing or gone) and the three scripts under torchrun.

The whole-run tests start real processes: ``torchrun --standalone --nproc_per_node=2`` with gloo
on the CPU, against one plain process, on 16 shapes images; a run killed halfway (every process
of it, SIGKILL) and started again; a corrupt image in a folder. Outputs are compared between
runs, never against stored numbers.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srd_ext import cli, data, distributed, fileio

from programs import ROOT, run_script

PY = sys.executable
N_IMAGES = 16


# ------------------------------------------------------------------------------------------ pieces
def test_env_one_process_without_torchrun_variables():
    env = distributed.Env.from_environ({})
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (0, 1, 0, True)


def test_env_from_torchrun_variables():
    env = distributed.Env.from_environ(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29400",
            "TORCHELASTIC_RESTART_COUNT": "2",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.restart, env.is_main) == (
        3,
        4,
        1,
        2,
        2,
        False,
    )


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=2: must be in 0..1"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x' is not an integer"),
        ({"RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "WORLD_SIZE is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be >= 1"),
    ],
)
def test_env_errors_name_the_variable(environ, message):
    with pytest.raises(distributed.DistributedError, match=re.escape(message)):
        distributed.Env.from_environ(environ)


@pytest.mark.parametrize("n,size,start", [(16, 4, 0), (17, 4, 3), (752, 16, 0), (3, 8, 5), (0, 4, 0)])
def test_blocks_and_shards_take_every_image_once(n, size, start):
    units = distributed.blocks(n, size, start)
    assert [i for b in units for i in b] == list(range(start, start + n))
    assert all(len(b) == size for b in units[:-1])
    for world in (1, 2, 3, 5):
        shares = [distributed.shard(units, r, world) for r in range(world)]
        taken = [b.key for share in shares for b in share]
        assert sorted(taken) == sorted(b.key for b in units) and len(set(taken)) == len(taken)  # no padding
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        distributed.shard(units, 2, 2)


def test_image_seed_depends_on_seed_and_image_only():
    a = [distributed.image_seed(0, i) for i in range(100)]
    assert a == [distributed.image_seed(0, i) for i in range(100)]
    assert len(set(a)) == 100 and distributed.image_seed(1, 5) != a[5]
    assert all(0 <= s < 2**63 for s in a)


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    fileio.atomic_write(str(path), "old\n")

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write(str(path), "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["table.csv"]  # no temporary file left
    monkeypatch.undo()
    fileio.atomic_write(str(path), "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["table.csv"]


def test_a_killed_write_leaves_a_temporary_file_the_next_run_removes(tmp_path):
    (tmp_path / ".a.png.srd-input.npy.k3j_x9aa.tmp").write_bytes(b"half")  # a killed atomic write
    (tmp_path / ".other.npy.abcdefgh.tmp").write_bytes(b"half")
    (tmp_path / "a.png.srd-input.npy").write_bytes(b"whole")
    (tmp_path / ".hidden.tmp").write_bytes(b"someone's")
    assert fileio.temporary_target(".a.png.srd-input.npy.k3j_x9aa.tmp") == "a.png.srd-input.npy"
    assert fileio.remove_stale_temporaries(str(tmp_path), ["a.png.srd-input.npy"]) == [
        ".a.png.srd-input.npy.k3j_x9aa.tmp"
    ]
    assert sorted(os.listdir(tmp_path)) == [".hidden.tmp", ".other.npy.abcdefgh.tmp", "a.png.srd-input.npy"]
    assert fileio.remove_stale_temporaries(str(tmp_path)) == [".other.npy.abcdefgh.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".hidden.tmp", "a.png.srd-input.npy"]


def test_tables_and_maps_read_without_srd_ext(tmp_path):
    maps = np.random.default_rng(0).standard_normal((3, 7, 5)).astype(np.float32)
    rows = []
    for i, m in enumerate(maps):
        fileio.save_npy(str(tmp_path / "maps" / f"{i:06d}.npy"), m)
        rows.append({"index": i, "image": f'a, "b" {i}.png', "score": float(m.mean()), "map_file": f"maps/{i:06d}.npy"})
    rows.append({"index": 3, "image": "missing", "score": None, "map_file": None})
    fileio.write_csv(str(tmp_path / "t.csv"), rows, ["index", "image", "score", "map_file"])
    code = """
import csv, json, os, sys
import numpy as np
os.chdir(sys.argv[1])
rows = list(csv.DictReader(open("t.csv", newline="")))
out = {"images": [r["image"] for r in rows], "scores": [r["score"] for r in rows],
       "maps": [np.load(r["map_file"]).tolist() for r in rows if r["map_file"]]}
try:
    import pandas as pd
    df = pd.read_csv("t.csv")
    out["pandas"] = [len(df), int(df["score"].isna().sum())]
except ImportError:
    pass
assert not [m for m in sys.modules if m.startswith("srd_ext")]
print(json.dumps(out))
"""
    res = subprocess.run([PY, "-I", "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["images"] == [r["image"] for r in rows]
    assert [float(s) for s in out["scores"][:3]] == [r["score"] for r in rows[:3]] and out["scores"][3] == ""
    np.testing.assert_array_equal(np.array(out["maps"], dtype=np.float32), maps)
    if "pandas" in out:
        assert out["pandas"] == [4, 1]


class OneProcess(distributed.Session):
    def __init__(self):
        super().__init__("cpu", env=distributed.Env())


def test_resume_log_resumes_skips_torn_lines_and_refuses_other_settings(tmp_path):
    folder = str(tmp_path / "run.parts")
    m = distributed.ResumeLog(folder, {"model": "a", "n": 16}, OneProcess())
    assert m.open() == {}
    m.add("0-4", {"x": [1.5, float("nan")]})
    m.add("4-8", {"x": [2.0]})
    m.close()
    with open(os.path.join(folder, "rank-0.jsonl"), "ab") as f:
        f.write(b'{"key": "8-12", "rec')  # a process killed while writing
    m = distributed.ResumeLog(folder, {"model": "a", "n": 16}, OneProcess())
    got = m.open()
    assert sorted(got) == ["0-4", "4-8"] and got["4-8"] == {"x": [2.0]} and np.isnan(got["0-4"]["x"][1])
    m.add("8-12", {"x": [3.0]})  # appended after the torn line, on a line of its own
    m.close()
    m = distributed.ResumeLog(folder, {"model": "a", "n": 16}, OneProcess())
    assert sorted(m.open()) == ["0-4", "4-8", "8-12"]
    m.close()
    other = distributed.ResumeLog(folder, {"model": "b", "n": 16}, OneProcess())
    with pytest.raises(distributed.SettingsMismatch, match=r"model: 'a' then, 'b' now.*delete"):
        other.open()
    (tmp_path / "run.parts" / "notes.txt").write_text("someone else's")
    m.remove()
    assert os.listdir(folder) == ["notes.txt"]  # only the run's own files are deleted


def test_one_process_session_needs_no_process_group():
    s = OneProcess()
    with s:
        assert s.share(lambda: 5) == 5 and s.gather("a") == ["a"] and s.broadcast(3) == 3
        s.beat("image 1", images=2)
        assert s.finish() == [{"rank": 0, "host": s.host, "ok": True, "error": "", "current": "image 1"}]
        assert distributed.failures(s.finish("failed on image 3 (OSError: x)")) == [
            f"rank 0 (on {s.host}): failed on image 3 (OSError: x), last working on image 1"
        ]
        with pytest.raises(KeyError):
            s.share(lambda: {}["missing"])


@pytest.mark.parametrize("script", ["benchmarks/eval_table.py", "examples/apop_accuracy.py", "srd_ext/cli.py"])
def test_every_option_passes_through_torchrun(script):
    from torch.distributed.run import get_args_parser

    if script.endswith("cli.py"):
        parser = cli.build_parser()
        options = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    else:  # the options the program's --help lists
        usage = run_script(script, "--help").stdout
        options = sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", usage)) - {"--help"})
    assert options
    for o in options:
        argv = ["script.py", o, "1"]
        assert get_args_parser().parse_args(argv).training_script_args == [o, "1"], o
    if script.endswith("eval_table.py"):
        assert "--num-images" in options and "--first-image" in options
        for old in ("--n", "--start"):  # torchrun takes these for its own options
            with pytest.raises(SystemExit):
                get_args_parser().parse_args(["script.py", old, "1"])


# ------------------------------------------------------------------------------------------ two ranks
WORKER = r"""
import json, sys, time
from srd_ext import distributed
mode, timeout = sys.argv[1], float(sys.argv[2])
s = distributed.Session("cpu", timeout=timeout)
s.start()
out = {"rank": s.rank}
try:
    if mode == "collectives":
        out["shared"] = s.share(lambda: {"plan": [1, 2, 3]})
        def bad():
            raise ValueError("no inputs found")
        try:
            s.share(bad)
        except ValueError as e:
            out["share_error"] = str(e)
        out["gather"] = s.gather({"rank": s.rank})
        s.beat("image 7", images=1)
        out["statuses"] = s.finish("failed on image 7 (OSError: broken file)" if s.rank == 1 else None)
    elif mode == "shared":  # each rank its own folder: machines without a shared file system
        try:
            s.check_shared_folder(f"{sys.argv[3]}/rank{s.rank}", settle=0.5)
        except distributed.DistributedError as e:
            out["check"] = str(e)
    else:  # rank 1 hangs without a beat
        s.beat("image 3")
        if s.rank == 1:
            time.sleep(float(sys.argv[3]))
        t = time.monotonic()
        out["statuses"] = s.finish()
        out["waited"] = time.monotonic() - t
except distributed.DistributedError as e:
    out["error"] = str(e)
print("RESULT " + json.dumps(out), flush=True)
s.close()
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_ranks(tmp_path, *args, timeout=120):
    """Start WORKER as ranks 0 and 1 (the environment torchrun would set); their results."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=str(ROOT),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [PY, str(script), *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results, started = [], time.monotonic()
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        m = re.search(r"^RESULT (.*)$", out, re.M)
        assert m, err[-3000:]
        results.append(dict(json.loads(m.group(1)), exit_seconds=time.monotonic() - started))
    return results


def test_two_ranks_share_gather_and_agree_on_a_failed_rank(tmp_path):
    r0, r1 = two_ranks(tmp_path, "collectives", 60)
    for r in (r0, r1):
        assert r["shared"] == {"plan": [1, 2, 3]}
        assert r["share_error"] == "no inputs found"  # raised on rank 0, raised on every rank
        assert [s["ok"] for s in r["statuses"]] == [True, False]
        assert distributed.failures(r["statuses"]) == [
            f"rank 1 (on {r['statuses'][1]['host']}): failed on image 7 (OSError: broken file)"
        ]
    assert r0["gather"] == [{"rank": 0}, {"rank": 1}] and r1["gather"] is None


def test_an_output_folder_the_machines_do_not_share_is_refused(tmp_path):
    r0, r1 = two_ranks(tmp_path, "shared", 60, tmp_path)
    for r in (r0, r1):
        assert "is not shared between the machines: rank 1 on" in r["check"] and "shared" in r["check"]
    assert os.listdir(tmp_path / "rank0") == []  # the probe file is removed


def test_a_rank_that_stops_answering_is_reported_and_not_waited_for(tmp_path):
    timeout, hang = 1.5, 8.0
    r0, r1 = two_ranks(tmp_path, "hang", timeout, hang)
    assert r0["waited"] < hang - 3  # rank 0 gave up after about --timeout, long before rank 1 woke
    lost = distributed.failures(r0["statuses"])
    assert len(lost) == 1 and lost[0].startswith("rank 1: stopped answering: no progress for 2 s")  # 1.5 s, rounded
    assert "last working on image 3" in lost[0]  # which image it was on
    # rank 1, when it wakes, reads the same verdict or finds rank 0 gone; it does not wait either
    assert r1.get("statuses") == r0["statuses"] or "lost the connection" in r1.get("error", "")
    assert r1["exit_seconds"] < hang + 30


# ------------------------------------------------------------------------------------------ whole runs
def run_env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_cmd(nproc, argv, module=False, timeout=600, torchrun=()):
    """The command as one process (nproc 0) or under torchrun with ``nproc`` processes."""
    target = ["-m", argv[0]] if module else [argv[0]]
    if nproc:
        cmd = [
            PY,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *torchrun,
            *target,
            *argv[1:],
        ]
    else:
        cmd = [PY, *target, *argv[1:]]
    return subprocess.run(cmd, env=run_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def descendants(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            out += [k] + descendants(k)
    return out


def run_and_kill(nproc, argv, ready, module=False, timeout=300):
    """Start the command, SIGKILL it and every process it started as soon as ``ready()``; the
    command must not have finished by then."""
    target = ["-m", argv[0]] if module else [argv[0]]
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else [PY]
    p = subprocess.Popen(
        cmd + target + argv[1:], env=run_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert p.poll() is None, "the run ended before it could be killed:\n" + p.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "timed out waiting for the run to make progress"
            time.sleep(0.02)
        pids = [p.pid] + descendants(p.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        p.wait(timeout=60)
        p.stdout.close()
    time.sleep(0.5)


def table_rows(stdout):
    return [line for line in stdout.splitlines() if line.startswith("| ")]


def tree(root, skip=()):
    """Relative path -> bytes of every file under ``root``."""
    out = {}
    for r, _, files in os.walk(root):
        for f in files:
            p = os.path.join(r, f)
            rel = os.path.relpath(p, root)
            if not any(re.search(s, rel) for s in skip):
                out[rel] = open(p, "rb").read()
    return out


def metric_columns(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if not k.endswith("_per_image")} for r in csv.DictReader(f)]


EVAL = [
    "benchmarks/eval_table.py",
    "--model",
    "shapes-resnet",
    "--num-images",
    str(N_IMAGES),
    "--methods",
    "srd-input,saliency,smoothgrad",
    "--batch-size",
    "2",
    "--fidelity-runs",
    "8",
    "--stability-samples",
    "1",
    "--stability-n",
    "10",
    "--examples",
    "2",
    "--save-maps",
    "--no-progress",
]
# timings and run facts differ from run to run; everything else must not
EVAL_VARIES = (r"\.json$", r"\.md$", r"^shapes-resnet\.csv$")


@pytest.fixture(scope="module")
def eval_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_one")
    res = run_cmd(0, EVAL + ["--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout


def check_eval_same(out, stdout, ref_out, ref_stdout):
    assert table_rows(stdout) == table_rows(ref_stdout) and len(table_rows(stdout)) == 4  # header and 3 methods
    assert metric_columns(out / "shapes-resnet.csv") == metric_columns(ref_out / "shapes-resnet.csv")
    a, b = tree(out, EVAL_VARIES), tree(ref_out, EVAL_VARIES)
    assert sorted(a) == sorted(b) and a == b  # per-image table, figure, every map
    assert sum(k.endswith(".npy") for k in a) == 3 * N_IMAGES
    ra, rb = (json.loads((o / "shapes-resnet.json").read_text())["rows"] for o in (out, ref_out))
    drop = ("explain_s_per_image", "fidelity_s_per_image", "stability_s_per_image")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == [
        {k: v for k, v in r.items() if k not in drop} for r in rb
    ]


def test_eval_table_two_processes_print_the_table_of_one(eval_one, tmp_path):
    ref_out, ref_stdout = eval_one
    res = run_cmd(2, EVAL + ["--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    check_eval_same(tmp_path, res.stdout, ref_out, ref_stdout)
    assert res.stdout.count("| Method |") == 1  # printed once, by rank 0
    assert "2 process(es)" in res.stdout
    assert not (tmp_path / "shapes-resnet.parts").exists()  # removed once the outputs are written
    with open(tmp_path / "shapes-resnet.per-image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * N_IMAGES and sorted({int(r["index"]) for r in rows}) == list(range(N_IMAGES))
    assert sum(r["stability"] != "" for r in rows) == 3 * 10  # --stability-n 10


def test_eval_table_on_two_machines_prints_the_table_of_one(eval_one, tmp_path):
    # Two torchrun agents with one process each, joined by c10d rendezvous, as on two machines
    # (here both on this one, with a shared output folder).
    ref_out, ref_stdout = eval_one
    port = free_port()
    cmd = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=eval-test",
        *EVAL,
        "--out",
        str(tmp_path),
    ]
    agents = [
        subprocess.Popen(cmd, env=run_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [a.communicate(timeout=600) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    stdout = "".join(out for out, _ in results)
    assert stdout.count("| Method |") == 1 and "2 process(es)" in stdout
    check_eval_same(tmp_path, stdout, ref_out, ref_stdout)


def test_eval_table_killed_and_resumed_equals_an_uninterrupted_run(eval_one, tmp_path):
    ref_out, ref_stdout = eval_one
    parts = tmp_path / "shapes-resnet.parts"

    def recorded():
        return sum(f.read_bytes().count(b"\n") for f in parts.glob("rank-*.jsonl")) if parts.exists() else 0

    run_and_kill(2, EVAL + ["--out", str(tmp_path)], lambda: recorded() >= 2)
    done = recorded()
    assert 2 <= done < N_IMAGES // 2 and not (tmp_path / "shapes-resnet.md").exists()  # stopped halfway
    res = run_cmd(0, EVAL + ["--out", str(tmp_path)])  # resumed, as one process this time
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.search(rf"resuming: {2 * done} of {N_IMAGES} images were finished", res.stderr)
    check_eval_same(tmp_path, res.stdout, ref_out, ref_stdout)
    assert not parts.exists()


def test_eval_table_leaves_out_an_unreadable_image_and_names_it(tmp_path):
    root = tmp_path / "ImageNet-S"
    for i in range(5):
        c = f"c{i % 2}"
        (root / "validation" / c).mkdir(parents=True, exist_ok=True)
        (root / "validation-segmentation" / c).mkdir(parents=True, exist_ok=True)
        img, mask, _ = data.render(0, "test", i, image_size=64)
        Image.fromarray(img).save(root / "validation" / c / f"im{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "validation-segmentation" / c / f"im{i}.png")
    (root / "validation" / "c1" / "im3.png").write_bytes(b"\x89PNG truncated")
    res = run_script(
        "benchmarks/eval_table.py",
        "--model",
        "shapes-vgg",
        "--data",
        root,
        "--num-images",
        "-1",
        "--methods",
        "saliency",
        "--batch-size",
        "2",
        "--fidelity-runs",
        "4",
        "--stability-samples",
        "0",
        "--examples",
        "1",
        "--out",
        tmp_path / "out",
        "--no-progress",
        check=False,
    )
    assert res.returncode == 1, res.stderr  # an image was left out
    report = json.loads((tmp_path / "out" / "shapes-vgg_ImageNet-S.json").read_text())
    assert [b["image"] for b in report["failed_images"]] == [os.path.join("validation", "c1", "im3.png")]
    assert report["settings"]["n"] == 4 and report["rows"][0]["pointing_game_n"] == 4
    md = (tmp_path / "out" / "shapes-vgg_ImageNet-S.md").read_text()
    assert "im3.png" in md and "Images left out" in md


def photos(folder):
    folder.mkdir(parents=True)
    x, _, _ = data.generate("test", N_IMAGES, uint8=True)
    for i in range(N_IMAGES):
        size = (112, 112) if i % 5 else (140, 112)  # a few of another shape: batches split by shape
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize(size).save(folder / f"s{i:02d}.png")
    (folder / "s07-corrupt.png").write_bytes(b"this is not a picture")
    return folder


CLI = [
    "srd_ext.cli",
    "--model",
    "shapes-resnet",
    "--layer",
    "input,high",
    "--crop",
    "none",
    "--batch-size",
    "3",
    "--panel",
]


@pytest.fixture(scope="module")
def explain_one(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain_one")
    src = photos(tmp / "photos")
    res = run_cmd(0, CLI + [str(src), "--out", str(tmp / "out"), "--report", "--manifest"], module=True)
    assert res.returncode == 1, res.stderr[-3000:]  # the corrupt image
    return src, tmp / "out", res


def test_srd_explain_two_processes_write_what_one_writes(explain_one, tmp_path):
    src, ref, ref_res = explain_one
    res = run_cmd(2, CLI + [str(src), "--out", str(tmp_path / "out"), "--report", "--manifest"], module=True)
    assert res.returncode != 0  # the corrupt image: exit status 1, as with one process
    for r in (res, ref_res):
        assert re.search(r"failed \S*s07-corrupt\.png: not a readable image", r.stderr)  # named
        assert f"{N_IMAGES + 1} input(s): {N_IMAGES} written, 0 skipped, 1 failed" in r.stdout
    assert res.stdout.count("input(s):") == 1  # one summary, by rank 0
    a, b = tree(tmp_path / "out"), tree(ref)
    assert sorted(a) == sorted(b) and a == b  # every map, the report and the manifest
    assert sum(k.endswith(".npy") for k in a) == 2 * N_IMAGES
    with open(tmp_path / "out" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows].count("written") == N_IMAGES
    for r in rows:
        if r["status"] == "written":
            m = np.load(tmp_path / "out" / r["npy_input"])
            assert m.shape == (int(r["height"]), int(r["width"]))


def test_srd_explain_killed_and_resumed_equals_an_uninterrupted_run(explain_one, tmp_path):
    src, ref, _ = explain_one
    out = tmp_path / "out"
    argv = CLI + [str(src), "--out", str(out), "--report", "--manifest"]

    def written():
        return len(list(out.glob("photos/*.srd-high.npy"))) if out.exists() else 0

    run_and_kill(0, argv, lambda: written() >= 4, module=True)
    assert 4 <= written() < N_IMAGES - 3 and not (out / "report.html").exists()
    res = run_cmd(2, argv, module=True)  # resumed with two processes
    assert re.search(r"resuming: \d+ input\(s\) were written by an earlier run", res.stderr), res.stderr[-3000:]
    assert f"{N_IMAGES + 1} input(s): {N_IMAGES} written, 0 skipped, 1 failed" in res.stdout
    a, b = tree(out), tree(ref)  # no temporary file of the killed run left either
    assert sorted(a) == sorted(b) and a == b
    assert not (out / cli.STATE_DIR).exists()


def image_folder(root):
    x, _, y = data.generate("test", 12, uint8=True)
    for i in range(12):
        d = root / f"{int(y[i]):02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(d / f"im{i:02d}.png")
    (root / "03" / "broken.png").write_bytes(b"not a png")
    return root


def test_apop_two_processes_count_what_one_counts_and_name_a_broken_image(tmp_path):
    root = image_folder(tmp_path / "folder")
    argv = [
        "examples/apop_accuracy.py",
        "--model",
        "shapes-vgg",
        "--data",
        str(root),
        "--batch-size",
        "4",
        "--binarize-each-layer",
    ]
    one = run_cmd(0, argv + ["--out", str(tmp_path / "one"), "--no-progress"])
    two = run_cmd(2, argv + ["--out", str(tmp_path / "two")], torchrun=["--tee", "2"])  # stderr lines prefixed by rank
    lines = two.stderr.replace("\r", "\n").splitlines()
    assert any(re.match(r"\[default0\]:APOP shapes-vgg: 100%.* 13/13 ", line) for line in lines)  # all ranks' images
    assert not [line for line in lines if line.startswith("[default1]") and "img/s" in line]  # rank 0's bar only
    for r in (one, two):
        assert r.returncode != 0 and re.search(r"03/broken\.png \(image \d+\) could not be read", r.stderr)
        assert "APOP on" in r.stdout and "(12 images)" in r.stdout  # the other 12 counted
    assert table_rows(one.stdout) == table_rows(two.stdout) and len(table_rows(one.stdout)) > 8
    drop = (r"\.json$",)
    assert tree(tmp_path / "one", drop) == tree(tmp_path / "two", drop)
