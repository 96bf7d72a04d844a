"""Evaluation on a Ray pool (a local instance on 127.0.0.1 with 2 CPUs, its own temp folder,
nothing left running): the merged .npz has the one-process bytes with 2 workers, when a worker
is killed mid-chunk, and when the driver is killed and the run resumed; a sweep over the pool
gives the one-process numbers; a worker that cannot open its artifacts stops the job with one
error."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from var_ssg.cluster import RayConfig
from var_ssg.evaluation.distributed import PoolConfig, pool_session
from var_ssg.evaluation.run import JobRequest
from var_ssg.evaluation.sampling import PartialRun, sample, sample_runs
from var_ssg.common.errors import ConfigError
from var_ssg.runtime.opener import PipelineSource
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# One CPU thread per process, the workers' share of the 2 CPUs: eager PyTorch's CPU matmuls may
# round differently with another thread count (DESIGN.md, "Evaluation at scale").
SOURCE = PipelineSource(model="var-d2-tiny", random_init=0, top_k=20, threads=1)
REQUEST = JobRequest(class_spec="3,1", per_class=2, batch=1, seed=5, ssg_beta="0.5", top_k=20)   # 4 batches
POOL = PoolConfig(ray=RayConfig(address="local", num_cpus=2), workers=2, chunk=1)


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _ray_processes(tmp):
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if tmp in ln]


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ray_tmp():
    """A short private temp folder for Ray (unix socket paths are short), so its processes can be
    found and none is left behind."""
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = d
    yield d
    if old is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = old
    for _ in range(30):
        if not _ray_processes(d):
            break
        time.sleep(1)
    assert not _ray_processes(d), _ray_processes(d)


@pytest.fixture(scope="module")
def ray_session(ray_tmp):
    from var_ssg.cluster import session
    with session(POOL.ray):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "one.npz")
    assert sample(SOURCE, REQUEST, out).complete
    return out


def test_two_workers_give_the_one_process_bytes(ray_session, reference, tmp_path):
    res = sample(SOURCE, REQUEST, str(tmp_path / "two.npz"), pool=POOL)
    assert res.complete and _bytes(tmp_path / "two.npz") == _bytes(reference)
    assert [w.index for w in res.workers] == [0, 1] and sum(w.images for w in res.workers) == 4
    assert all(w.images > 0 and 0 <= w.idle_share < 1 for w in res.workers)        # both took work


def test_worker_killed_mid_chunk_loses_only_that_chunk(ray_session, reference, tmp_path):
    out = str(tmp_path / "killed.npz")
    killed = []
    with pool_session(POOL, [SOURCE]) as pool:
        pipe = pool.infos[0]
        from var_ssg.evaluation.run import PipelineView
        job = REQUEST.job(PipelineView(pipe))
        run = PartialRun(out, job, job.settings(PipelineView(pipe), pool.note)).open(resume=False)

        def progress(done, total):
            if done and not killed and pool.busy_pids():          # a worker holding a chunk right now
                killed.append(pool.busy_pids()[0])
                os.kill(killed[0], signal.SIGKILL)

        try:
            assert sample_runs(pool, [run], progress=progress)
        finally:
            run.close()
        stats = pool.stats
    assert killed and sum(w.deaths for w in stats) == 1
    assert _bytes(out) == _bytes(reference)


def test_driver_killed_then_resumed(ray_tmp, reference, tmp_path, caplog):
    out = tmp_path / "driver.npz"
    own_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")           # the killed driver's Ray, found by its folder
    args = ["--model", "var-d2-tiny", "--random-init", "0", "--classes", "3,1", "--per-class", "2", "--batch", "1",
            "--seed", "5", "--ssg-beta", "0.5", "--top-k", "20", "--out", str(out)]
    env = dict(os.environ, RAY_TMPDIR=own_tmp,
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "sample.py"), *args,
                             "--address", "local", "--workers", "2", "--chunk", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    part = str(out) + ".partial"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(part) and any(n.startswith("batch_") for n in os.listdir(part)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the driver ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)                       # the driver only: its Ray goes with it
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for _ in range(60):                                         # Ray's processes follow their driver
        if not _ray_processes(own_tmp):
            break
        time.sleep(1)
    assert not _ray_processes(own_tmp), _ray_processes(own_tmp)
    assert not out.exists()
    kept = [n for n in os.listdir(part) if n.startswith("batch_")]
    assert kept
    from var_ssg.tools.commands import sample as cmd
    with caplog.at_level("INFO"):
        assert cmd.main([*args, "--resume", "--address", "local", "--workers", "2", "--chunk", "1"]) == 0
    assert f"resuming: {len(kept)} of 4 batches done" in caplog.text         # nothing finished redone
    assert _bytes(out) == _bytes(reference) and not os.path.exists(part)


def test_sweep_on_two_workers_equals_one_process(ray_session, reference, tmp_path):
    from var_ssg.evaluation.sweep import SweepConfig, run_sweep
    req = JobRequest(class_spec="3,1", per_class=1, batch=1, seed=5, top_k=20)
    rows = {}
    for name, pool in (("one", None), ("two", POOL)):
        d = tmp_path / name
        d.mkdir()
        cfg = SweepConfig(betas=("0", "0.5", "linear:0.1,0.3"), out_dir=str(d), ref=reference, extractor="pixels")
        res = run_sweep([SOURCE], req, cfg, pool=pool)
        rows[name] = [{k: v for k, v in r.items() if k != "s_per_img"} for r in res.rows]
        assert all(r["s_per_img"] > 0 for r in res.rows)
    assert rows["one"] == rows["two"] and len(rows["one"]) == 3
    for point in ("dct_0", "dct_0.5", "dct_linear_0.1_0.3"):
        assert _bytes(tmp_path / "one" / point / "samples.npz") == _bytes(tmp_path / "two" / point / "samples.npz")


def test_worker_that_cannot_open_its_artifacts_stops_the_job(ray_session, tmp_path):
    bad = PipelineSource(artifacts=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^worker \d on .*nowhere"):
        sample(bad, REQUEST, str(tmp_path / "x.npz"), pool=POOL)
    assert not os.path.exists(tmp_path / "x.npz.partial")
