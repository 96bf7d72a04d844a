"""Start-up costs: the export's optimiser (same graph, faster), weights written once and hashed
while written, stage timings, and the verified stamp that lets later starts skip re-hashing."""
import io
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from var_ssg.common.files import sha256_file
from var_ssg.contract import stamp
from var_ssg.contract.manifest import ManifestError, load_manifest
from var_ssg.common.errors import ConfigError

EXPORT_STAGES = ["step_export", "write", "decoder", "flush", "check", "manifest"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("VAR_SSG_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def exported(artifacts):
    """The session's var-d2-tiny export: (dir, manifest, stages its progress named, the stamp
    cache it wrote to)."""
    out = artifacts()
    return out, load_manifest(out, verify_hashes=False).data, artifacts.stages[out], artifacts.cache[out]


def _count_hashes(monkeypatch):
    import var_ssg.contract.filecheck as m          # load_manifest hashes through contract.filecheck
    hashed = []
    real = m.sha256_file

    def counting(path, *a, **kw):
        hashed.append(os.path.basename(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(m, "sha256_file", counting)
    return hashed


@pytest.mark.slow
def test_export_records_stages_hashes_while_writing_and_stamps(exported, monkeypatch):
    out, man, seen, cache = exported
    assert seen == EXPORT_STAGES                                    # progress names each stage as it starts
    assert list(man["export"]["stage_seconds"]) == EXPORT_STAGES[:-1]   # recorded up to the manifest itself
    assert all(s >= 0 for s in man["export"]["stage_seconds"].values())
    data = load_manifest(out, verify_hashes=False).data
    w = data["external_data"]["file"]
    assert data["files"][w]["sha256"] == sha256_file(os.path.join(out, w))     # the hash taken while writing
    # the export's own stamp: a stamp-mode start hashes only the small files
    monkeypatch.setenv("VAR_SSG_CACHE", cache)
    monkeypatch.setattr(stamp, "SMALL_BYTES", 1)
    hashed = _count_hashes(monkeypatch)
    load_manifest(out, verify="stamp")
    assert hashed == []
    load_manifest(out, verify="full")
    assert sorted(hashed) == sorted(data["files"])


@pytest.mark.slow
def test_stamp_skips_unchanged_files_and_catches_changed_ones(exported, tmp_path, monkeypatch):
    out = str(tmp_path / "copy")
    shutil.copytree(exported[0], out)                     # new inodes: the export's stamp does not apply
    monkeypatch.setattr(stamp, "SMALL_BYTES", 1)
    hashed = _count_hashes(monkeypatch)
    files = load_manifest(out, verify="stamp").data["files"]
    assert sorted(hashed) == sorted(files)                # no stamp yet: every file hashed, then stamped
    hashed.clear()
    load_manifest(out, verify="stamp")
    assert hashed == []
    # the same size, the old mtime put back: ctime still moves, so the stamp no longer vouches
    w = os.path.join(out, "weights.bin")
    st = os.stat(w)
    with open(w, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ManifestError, match="sha256 does not match"):
        load_manifest(out, verify="stamp")


def test_stamp_vouches_only_for_large_files_with_the_same_identity_and_hash(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    st = os.lstat(p)
    entries = {"f": dict(key=list(stamp.file_key(st)), sha256="a" * 64)}
    big = dict(bytes=100, sha256="a" * 64)
    assert not stamp.vouches(entries, "f", big, st)                 # below SMALL_BYTES: always hashed
    old = stamp.SMALL_BYTES
    stamp.SMALL_BYTES = 1
    try:
        assert stamp.vouches(entries, "f", big, st)
        assert not stamp.vouches(entries, "f", dict(big, sha256="b" * 64), st)     # another manifest
        assert not stamp.vouches(entries, "g", big, st)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        assert not stamp.vouches(entries, "f", big, os.lstat(p))
    finally:
        stamp.SMALL_BYTES = old


def test_stamp_in_an_unwritable_cache_is_no_error(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text("{}")
    blocker = tmp_path / "notadir"
    blocker.write_text("")
    monkeypatch.setenv("VAR_SSG_CACHE", str(blocker))
    stamp.record(str(tmp_path), "manifest.json", [("x", (1, 2, 3, 4, 5), "a" * 64)])
    assert stamp.read(str(tmp_path), "manifest.json") == {}


def test_load_manifest_refuses_an_unknown_verify_mode(tmp_path):
    with pytest.raises(ConfigError, match="verify must be one of"):
        load_manifest(str(tmp_path), verify="quick")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_weights_are_written_from_the_tensors_own_memory(dtype):
    from torch.onnx._internal.exporter._core import TorchTensor
    from var_ssg.export.store import tensor_bytes
    t = TorchTensor((torch.arange(24, dtype=torch.float32) * 1.5).reshape(2, 3, 4).to(dtype))
    view = tensor_bytes(t)
    assert bytes(view) == t.tobytes()
    if dtype is torch.float32:
        assert view.obj.ctypes.data == t.raw.data_ptr()       # no copy


def test_stage_display_names_each_stage_and_sums_up():
    from var_ssg.tools.progress import StageDisplay
    s = io.StringIO()
    with StageDisplay("export x", stream=s) as d:
        d("weights")
        d("step_export")
    text = s.getvalue()
    assert "export x: weights ..." in text and "export x: step_export done in" in text
    assert list(d.seconds) == ["weights", "step_export"]
    assert d.summary().startswith("stages: weights ") and "; total " in d.summary() and "(CPU " in d.summary()


def test_generate_refuses_a_bad_verify_mode(capsys):
    from var_ssg.tools.commands import generate
    with pytest.raises(SystemExit, match="^2$") as e:
        generate.main(["--backend", "onnxruntime", "--artifacts", "x", "--verify", "quick"])
    assert e.value.code == 2 and "--verify" in capsys.readouterr().err


@pytest.mark.slow
def test_optimiser_gives_torchs_graph_byte_for_byte(tiny):
    """export.optimize skips one rewrite rule for speed; the step graph must stay torch's own."""
    import onnx_ir as ir
    from var_ssg.export.dynamo import export_one
    from var_ssg.graphs.components import StepComponent
    from var_ssg.graphs.step import StepSpec
    cfg, var, vae = tiny
    step = StepComponent(cfg, 1, StepSpec(transform="dct", k_max=64, dtype=torch.float32))
    m, feeds = step.module(var, vae).eval(), step.example_feeds(step.example_scale())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ref = torch.onnx.export(m, (), kwargs=feeds, dynamo=True, input_names=step.inputs, output_names=step.outputs,
                                opset_version=18, optimize=True, verbose=False,
                                dynamic_shapes=step.dynamic_shapes()).model
    ours = export_one(m, feeds, step.inputs, step.outputs, 18, dynamic_shapes=step.dynamic_shapes())
    assert ir.to_proto(ours).SerializeToString(deterministic=True) == \
        ir.to_proto(ref).SerializeToString(deterministic=True)


@pytest.mark.slow
def test_onnxruntime_sessions_build_while_the_schema_is_checked(exported, tmp_path, monkeypatch):
    """open_artifacts: the files are verified, the sessions start, and only then the schema check
    runs; the backend uses the sessions started early."""
    import var_ssg.contract.schema as m
    import var_ssg.runtime.backends.ort as ort_mod
    from var_ssg.runtime.opener import open_artifacts
    order = []
    real_validate, real_init = m.validate, ort_mod.OrtSessions.__init__

    def validate(*a, **kw):
        order.append("schema")
        return real_validate(*a, **kw)

    def init(self, *a, **kw):
        order.append("sessions")
        real_init(self, *a, **kw)
    monkeypatch.setattr(m, "validate", validate)
    monkeypatch.setattr(ort_mod.OrtSessions, "__init__", init)
    man, b = open_artifacts(exported[0], "onnxruntime", clock=order.append)
    assert order == ["files", "sessions", "schema", "manifest"]      # one session build, before the schema
    assert set(b.sessions) == {"step", "decoder"}


@pytest.mark.slow
def test_a_schema_error_after_an_early_start_is_still_the_error(exported, tmp_path):
    """Files intact, schema wrong (a field the files do not cover): the early sessions are
    dropped and the schema's message comes back, as without an early start."""
    import json
    from var_ssg.runtime.opener import open_artifacts
    out = str(tmp_path / "a")
    shutil.copytree(exported[0], out)
    p = os.path.join(out, "manifest.json")
    data = json.load(open(p))
    data["ssg"] = dict(data["ssg"], beta="something else")      # only the schema reads this field
    with open(p, "w") as f:
        json.dump(data, f)
    with pytest.raises(ManifestError, match="field 'ssg' is not this format's note"):
        open_artifacts(out, "onnxruntime")


@pytest.mark.slow
def test_an_early_start_that_fails_leaves_the_error_to_the_ordinary_open(exported, monkeypatch):
    """A problem in the early start (here: no onnxruntime) is not raised there; the ordinary open
    after the schema check reports it with its own message."""
    import var_ssg.runtime.backends.ort as ort_mod
    from var_ssg.runtime.opener import open_artifacts
    calls = []

    def no_ort():
        calls.append(1)
        raise ConfigError("the onnxruntime backend needs the onnxruntime package")
    monkeypatch.setattr(ort_mod, "import_ort", no_ort)
    with pytest.raises(ConfigError, match="needs the onnxruntime package"):
        open_artifacts(exported[0], "onnxruntime")
    assert len(calls) == 2              # tried early, then again by the ordinary open


@pytest.mark.slow
def test_onnxruntime_on_the_cpu_never_imports_torch(exported, tmp_path):
    """generate.py over artifacts with ONNX Runtime on the CPU, in a process where importing
    torch fails: the same PNG and tokens as in a process with torch (the noise, feeds, KV cache
    and images are numpy), a more_smooth row's Gumbel noise included."""
    from tests.conftest import run_cli, run_script
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n")
    env = {"VAR_SSG_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(hook)}
    args = ["--backend", "onnxruntime", "--artifacts", exported[0], "--class", "1", "--seed", "3",
            "--top-k", "40", "--ssg-beta", "linear:0.2,0.6"]
    r = run_script("generate.py", *args, "--out", tmp_path / "a.png", "--save-tokens", tmp_path / "a.json", env=env)
    assert r.returncode == 0, r.stderr[-800:]
    r = run_cli("generate.py", *args, "--out", tmp_path / "b.png", "--save-tokens", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr[-800:]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    r = run_script("generate.py", *args, "--more-smooth", "--out", tmp_path / "c.png", env=env)
    assert r.returncode == 0, r.stderr[-800:]
    r = run_cli("generate.py", *args, "--more-smooth", "--out", tmp_path / "d.png")
    assert r.returncode == 0 and (tmp_path / "c.png").read_bytes() == (tmp_path / "d.png").read_bytes()


@pytest.mark.slow
def test_session_cache_is_written_once_then_loaded_and_a_changed_entry_is_rebuilt(exported, cache, monkeypatch):
    """--session-cache: off by default (nothing written); the first open saves ONNX Runtime's
    optimised step graph with its pre-packed weights, the next loads that instead of the
    artifacts' graph, with the same tokens and pixels; an entry whose file changed since it was
    written (here: bytes overwritten in place), or made for other options, is rebuilt; a save
    removes what a killed writer left and entries whose artifacts are gone."""
    import numpy as np
    import onnxruntime as ort
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.pipeline import Pipeline, Row
    opened = []
    real = ort.InferenceSession

    class Spy(real):
        def __init__(self, path, *a, **kw):
            opened.append(os.path.basename(str(path)))
            super().__init__(path, *a, **kw)
    monkeypatch.setattr(ort, "InferenceSession", Spy)
    rows = [Row(1, 3, top_k=40, ssg_beta="linear:0.2,0.6")]

    def run(**kw):
        opened.clear()
        return Pipeline(open_backend("onnxruntime", exported[0], **kw)).run_rows(rows)
    plain = run()
    assert not (cache / "ort").exists() and "step_all.onnx" in opened
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = cache / "ort" / f".tmp-{int(gone.stdout)}-x", cache / "ort" / f".tmp-{os.getpid()}-y"
    orphan = cache / "ort" / "1-2"                         # an entry for artifacts that are gone
    for d in (dead, alive, orphan):                        # what a killed writer / a running one leaves
        d.mkdir(parents=True)
    (orphan / "entry.json").write_text(json.dumps(dict(format=1, key="k", artifacts=str(cache / "gone"),
                                                       manifest=[1, 2], files={})))
    first = run(session_cache=True)
    assert not dead.exists() and alive.exists() and not orphan.exists()
    alive.rmdir()
    entries = lambda: [p for p in (cache / "ort").iterdir() if p.is_dir()]     # noqa: E731
    (entry,) = entries()
    assert sorted(p.name for p in entry.iterdir()) == ["entry.json", "step.data", "step.onnx"]
    assert "step_all.onnx" in opened                       # built (and saved) from the artifacts
    second = run(session_cache=True)
    assert "step.onnx" in opened and "step_all.onnx" not in opened      # loaded from the cache
    data = entry / "step.data"
    with open(data, "r+b") as f:                           # same size, other bytes (the weights' middle)
        f.seek(data.stat().st_size // 2)
        f.write(b"\x7f" * 4096)
    third = run(session_cache=True)
    assert "step_all.onnx" in opened and "step.onnx" not in opened      # not trusted: rebuilt
    opened.clear()
    be = open_backend("onnxruntime", exported[0], session_cache=True, threads=1)   # threads: set at load
    assert "step.onnx" in opened and be.sessions["step"].get_session_options().intra_op_num_threads == 1
    fourth = run(session_cache=True, prepack=False)                      # another graph saved: another key
    assert "step_all.onnx" in opened and "step.onnx" not in opened
    assert len(entries()) == 1                                           # one entry per artifacts directory
    for r in (first, second, third, fourth):
        assert all(np.array_equal(a, b) for a, b in zip(r.tokens, plain.tokens))
        assert np.array_equal(r.images, plain.images)


@pytest.mark.slow
def test_session_cache_that_cannot_be_written_is_no_error(exported, tmp_path, monkeypatch, caplog):
    """A cache location that is a file, a folder that cannot be written, a full disk when the
    entry is put in place, another process writing the entry: each time the session is built as
    without the cache, with a warning."""
    import var_ssg.runtime.backends.ort_cache as oc
    from var_ssg.runtime.backends import open_backend
    from var_ssg.runtime.pipeline import Pipeline, Row
    rows = [Row(2, 5, top_k=40)]
    want = Pipeline(open_backend("onnxruntime", exported[0])).run_rows(rows)

    def no_space(*a, **kw):
        raise OSError(28, "No space left on device")

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    import fcntl
    man_st = os.lstat(os.path.join(exported[0], "manifest.json"))
    for case in ("file", "mkdtemp", "rename", "locked"):
        monkeypatch.setenv("VAR_SSG_CACHE", str(blocker if case == "file" else tmp_path / case))
        with monkeypatch.context() as m, open(os.devnull) as held:
            if case == "locked":                     # another process is writing this entry
                (tmp_path / case / "ort").mkdir(parents=True)
                held = open(tmp_path / case / "ort" / f"{man_st.st_dev}-{man_st.st_ino}.lock", "a")
                fcntl.flock(held, fcntl.LOCK_EX)
            if case == "mkdtemp":
                m.setattr(oc.tempfile, "mkdtemp", denied)
            if case == "rename":
                m.setattr(oc.os, "rename", no_space)
            caplog.clear()
            got = Pipeline(open_backend("onnxruntime", exported[0], session_cache=True)).run_rows(rows)
            held.close()
        assert (got.images == want.images).all(), case
        assert "session cache not written" in caplog.text, case
        assert not any(p.is_dir() for p in (tmp_path / case / "ort").glob("*")), case    # nothing half-made
    assert blocker.read_text() == "x"


def test_session_cache_is_refused_where_it_does_not_apply(tmp_path):
    from tests.conftest import run_cli
    r = run_cli("generate.py", "--model", "var-d2-tiny", "--random-init", "0", "--class", "1", "--session-cache",
                "--out", tmp_path / "x.png")
    assert r.returncode == 2 and "--session-cache keeps ONNX Runtime's CPU session" in r.stderr, r.stderr[-500:]
    assert not (tmp_path / "x.png").exists()


def test_reading_a_manifest_and_parsing_arguments_import_no_torch():
    """graphs.config, contract.manifest, the ONNX Runtime backend module and the opener load
    without torch, so ONNX Runtime can start before it (and argument errors come back at once)."""
    import subprocess
    import sys
    code = ("import sys, tools.cli, graphs.config, contract.manifest, runtime.opener, runtime.backends.ort, "
            "tools.commands.generate; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-800:]


@pytest.mark.slow
def test_a_schema_error_after_an_early_start_exits_cleanly(exported, tmp_path):
    """The CLI over artifacts whose schema fails after the sessions started early: the one-line
    error and exit 2, not an abort (a daemon build thread killed inside ONNX Runtime at exit)."""
    import json
    from tests.conftest import run_script
    out = str(tmp_path / "a")
    shutil.copytree(exported[0], out)
    p = os.path.join(out, "manifest.json")
    data = json.load(open(p))
    data["created"] = 5
    with open(p, "w") as f:
        json.dump(data, f)
    r = run_script("generate.py", "--backend", "onnxruntime", "--artifacts", out, "--class", "1",
                   "--out", tmp_path / "x.png", env={"VAR_SSG_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and "field 'created'" in r.stderr, (r.returncode, r.stderr[-800:])
    assert "terminate" not in r.stderr and not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_generate_as_its_own_process_skips_the_teardown_and_writes_everything(exported, tmp_path):
    """`python scripts/generate.py` leaves without the interpreter's teardown after a success
    (an atexit hook never runs), its output flushed and its PNG the in-process run's bytes;
    a failure still exits through the teardown; a command run inside a caller's process (here,
    this test's run_cli) returns to the caller."""
    from tests.conftest import run_cli, run_script
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, sys\natexit.register(lambda: print('teardown ran', file=sys.stderr))\n")
    env = {"VAR_SSG_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(hook), "PYTHONUNBUFFERED": ""}  # buffered
    args = ["--backend", "onnxruntime", "--artifacts", exported[0], "--class", "1", "--seed", "3"]
    r = run_script("generate.py", *args, "--out", tmp_path / "own.png", env=env)
    assert r.returncode == 0, r.stderr[-800:]
    assert "wrote " in r.stdout and "start-up " in r.stderr and "teardown ran" not in r.stderr, r.stderr[-800:]
    r = run_cli("generate.py", *args, "--out", tmp_path / "here.png")
    assert r.returncode == 0 and "wrote " in r.stdout, r.stderr[-800:]
    assert (tmp_path / "own.png").read_bytes() == (tmp_path / "here.png").read_bytes()
    r = run_script("generate.py", *args, "--out", tmp_path / "no-such-dir" / "x.png", env=env)
    assert r.returncode == 2 and "teardown ran" in r.stderr, r.stderr[-800:]
