"""Reliability, case by case: --force never deletes what the user owns; artifacts stay
inside their directory and a malformed manifest is refused on load; outputs are checked before
the work and written atomically; every user or environment error is one line and exit 2.

Scripts run in-process (`cli`: runpy with sys.argv, SystemExit caught): any other exception
escapes as a failing test, which is exactly a traceback a user would have seen. Each case also
checks that no user file changed and nothing half-written is left.
"""
import re
import errno
import json
import os
import pathlib
import shutil
import stat
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from var_ssg.contract.manifest import FORMAT, FORMAT_VERSION, ManifestError, load_manifest, write_manifest
from var_ssg.graphs.config import SamplerConfig, SSGConfig, check_guidance, check_seed, get_preset
from var_ssg.common.errors import ConfigError
from tests.conftest import ROOT, TINY, alarm_guard, run_cli, run_script

MODEL = ["--model", TINY, "--random-init", "0"]


# ------------------------------------------------------------------------------ helpers
@dataclass
class Result:
    rc: int
    out: str
    err: str


@pytest.fixture
def cli():
    """Run scripts/NAME's main as `python scripts/NAME args` would, in this process."""
    def run(script, *args):
        r = run_cli(script, *args)
        return Result(r.returncode, r.stdout, r.stderr)
    return run


def one_line_error(r: Result, msg: str):
    """Exit 2, no traceback, exactly one error line (progress bars aside), containing msg."""
    assert "Traceback" not in r.err, r.err
    lines = [line for line in r.err.splitlines() if "error:" in line]
    assert r.rc == 2 and len(lines) == 1 and msg in lines[0], (r.rc, r.err[-1500:])
    return lines[0]


def snapshot(root) -> dict:
    """Every entry under root: bytes of files, link targets, modes of everything."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            body = (os.readlink(p) if stat.S_ISLNK(st.st_mode) else
                    open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), body)
    out["."] = stat.S_IMODE(os.stat(root).st_mode)
    return out


@pytest.fixture
def no_hang():
    """A FIFO or device opened by mistake would block forever: turn that into a failure."""
    with alarm_guard("blocked: something opened a FIFO or device"):
        yield


def user_dir(tmp_path):
    """A folder of someone's unrelated files (and a private mode)."""
    d = tmp_path / "thesis"
    (d / "sub").mkdir(parents=True)
    (d / "thesis.txt").write_bytes(b"four years of work\n")
    (d / "sub" / "data.csv").write_bytes(b"a,b\n1,2\n")
    os.chmod(d, 0o750)
    return d


def fake_artifacts(d, key="another-key", extra=()):
    """A small directory that looks like an export's output (format, listed files)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "step_all.onnx").write_bytes(b"graph")
    write_manifest(str(d), dict(format=FORMAT, format_version=FORMAT_VERSION, cache_key=key))
    for name in extra:
        (d / name).write_bytes(b"mine")
    return d


# ------------------------------------------------------------------------------ 1. data loss
@pytest.mark.parametrize("force", [False, True])
def test_export_never_replaces_a_folder_of_user_files(cli, tmp_path, force):
    d = user_dir(tmp_path)
    before = snapshot(tmp_path)
    r = cli("export.py", *MODEL, "--out", d, *(["--force"] if force else []))
    one_line_error(r, "holds files that are not var-ssg artifacts")
    assert "even with --force" in r.err
    assert snapshot(tmp_path) == before          # every byte, every mode, nothing added beside it


def test_export_force_on_home_is_refused(cli, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH\n")
    (home / "notes.md").write_text("keep\n")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(tmp_path)
    r = cli("export.py", *MODEL, "--out", os.path.expanduser("~"), "--force")
    one_line_error(r, "not var-ssg artifacts")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case,msg", [
    ("extra-file", "holds 'notes.txt', which its manifest does not list"),
    ("subfolder", "holds 'keep', which its manifest does not list"),
    ("symlink", "is a symbolic link"),
    ("file", "exists and is not a directory"),
    ("long-name", "is too long"),
])
def test_export_out_refusals(cli, tmp_path, case, msg):
    out = tmp_path / "art"
    if case == "extra-file":            # an artifacts directory the user has put a file into
        fake_artifacts(out, extra=["notes.txt"])
    elif case == "subfolder":
        fake_artifacts(out)
        (out / "keep").mkdir()
        (out / "keep" / "x").write_text("x")
    elif case == "symlink":
        fake_artifacts(tmp_path / "real")
        out.symlink_to(tmp_path / "real")
    elif case == "file":
        out.write_text("a file")
    else:
        out = tmp_path / ("n" * 250)
    before = snapshot(tmp_path)
    one_line_error(cli("export.py", *MODEL, "--out", out, "--force"), msg)
    assert snapshot(tmp_path) == before


def test_check_out_refuses_the_root_and_nothing():
    from var_ssg.export.onnx_export import ExportError, check_out
    with pytest.raises(ExportError, match="file-system root"):
        check_out("/")
    with pytest.raises(ExportError, match="--out is empty"):
        check_out(" ")


# ------------------------------------------------------------------------------ 6. export: lock, leftovers, replace
def _fake_export(monkeypatch, during=None, fail=None):
    """Replace the (slow) graph export by one that writes a tiny artifact set; calls recorded."""
    from var_ssg.export import onnx_export
    calls = []

    def export_into(var, vae, src, tmp, ec, key, progress):
        calls.append(tmp)
        (pathlib.Path(tmp) / "step_all.onnx").write_bytes(b"new graph")
        if during:
            during()
        if fail:
            raise fail
        data = dict(format=FORMAT, format_version=FORMAT_VERSION, cache_key=key, graphs={}, external_data={})
        write_manifest(tmp, data)
        return data
    monkeypatch.setattr(onnx_export, "_export_into", export_into)
    return calls


def _export(tiny, out, force=False, **kw):
    from var_ssg.export.onnx_export import ExportConfig, export_artifacts
    from var_ssg.graphs.weights import WeightSource
    return export_artifacts(tiny[1], tiny[2], WeightSource(kind="random", seed=0), str(out),
                            ExportConfig(top_k=64, **kw), force=force)


def test_stale_temporaries_of_a_killed_export_are_removed(tiny, tmp_path, monkeypatch, caplog):
    from var_ssg.export.publish import TEMP_MARK, TEMP_MARK_NAME
    _fake_export(monkeypatch)
    stale = [tmp_path / ".art.tmp-abcd1234" / "out", tmp_path / ".art.old-0k_9zz12" / "old"]
    for s in stale:                     # as a killed export leaves them: marked
        s.mkdir(parents=True)
        (s / "weights.bin").write_bytes(b"\0" * 1000)
        (s.parent / TEMP_MARK_NAME).write_bytes(TEMP_MARK)
    keep = [tmp_path / ".other.tmp-abcd1234", tmp_path / ".art.tmp-mine", tmp_path / "art.tmp-abcd1234"]
    for k in keep:                      # another --out's temporaries, and names that are not ours
        k.mkdir()
        (k / TEMP_MARK_NAME).write_bytes(TEMP_MARK)
    with caplog.at_level("WARNING"):
        res = _export(tiny, tmp_path / "art")
    assert not res.reused and (tmp_path / "art" / "manifest.json").is_file()
    assert sorted(os.listdir(tmp_path)) == sorted(["art"] + [k.name for k in keep])
    [rec] = [r for r in caplog.records if "interrupted export" in r.getMessage()]
    assert "removed 2 temporary directories left by an interrupted export of" in rec.getMessage()


@pytest.mark.parametrize("name", [".art.tmp-mythesis", ".art.old-backup_1"])
def test_the_sweep_never_deletes_a_users_folder_by_its_name(tiny, tmp_path, monkeypatch, name):
    """A folder of the user's whose name looks like an export's temporary (the issue's probe) is
    not the export's: it carries no mark, and it stays with its contents."""
    _fake_export(monkeypatch)
    mine = tmp_path / name
    (mine / "sub").mkdir(parents=True)
    (mine / "chapter1.txt").write_bytes(b"four years of work\n")
    (mine / "sub" / "data.csv").write_bytes(b"a,b\n")
    (mine / ".var-ssg-export-temporary").symlink_to(tmp_path / "elsewhere")    # a link is not the mark
    before = snapshot(mine)
    res = _export(tiny, tmp_path / "art")
    assert not res.reused and sorted(os.listdir(tmp_path)) == sorted(["art", name])
    assert snapshot(mine) == before
    assert sorted(os.listdir(tmp_path / "art")) == ["manifest.json", "step_all.onnx"]      # the mark stays outside


def test_concurrent_export_to_one_out_is_refused(tiny, tmp_path, monkeypatch):
    from var_ssg.export.publish import OutBusy, lock as _lock, unlock as _unlock
    calls = _fake_export(monkeypatch)
    lock = _lock(str(tmp_path), "art")          # as a running export holds it
    try:
        with pytest.raises(OutBusy, match="another export is writing .*art"):
            _export(tiny, tmp_path / "art")
    finally:
        _unlock(lock)
    assert not calls and os.listdir(tmp_path) == []
    _export(tiny, tmp_path / "art")             # free again: works, and the lock file is gone
    assert os.listdir(tmp_path) == ["art"]


def test_failed_export_leaves_nothing_not_even_parents(cli, tmp_path, monkeypatch):
    _fake_export(monkeypatch, fail=OSError(errno.ENOSPC, "No space left on device", "weights.bin"))
    r = cli("export.py", *MODEL, "--out", tmp_path / "a" / "b" / "art")
    one_line_error(r, "No space left on device")
    assert "nothing was written" in r.err and os.listdir(tmp_path) == []


def test_replace_keeps_the_mode_and_needs_force_for_other_artifacts(tiny, tmp_path, monkeypatch):
    _fake_export(monkeypatch)
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    os.chmod(empty, 0o700)
    _export(tiny, empty)                        # an empty folder: replaced, its mode kept
    assert stat.S_IMODE(os.stat(empty).st_mode) == 0o700 and (empty / "manifest.json").is_file()
    other = fake_artifacts(tmp_path / "other")
    before = snapshot(other)
    from var_ssg.export.onnx_export import OutTaken
    with pytest.raises(OutTaken, match="holds other artifacts; pass --force"):
        _export(tiny, other)
    assert snapshot(other) == before
    res = _export(tiny, other, force=True)
    assert not res.reused and (other / "step_all.onnx").read_bytes() == b"new graph"
    assert sorted(os.listdir(tmp_path)) == ["empty", "other"]          # no trash, no lock left


def test_files_added_during_an_export_are_never_replaced(tiny, tmp_path, monkeypatch):
    out = fake_artifacts(tmp_path / "art")
    _fake_export(monkeypatch, during=lambda: (out / "thesis.txt").write_text("written meanwhile"))
    from var_ssg.export.onnx_export import ExportError
    with pytest.raises(ExportError, match="holds 'thesis.txt'"):
        _export(tiny, out, force=True)
    assert (out / "thesis.txt").read_text() == "written meanwhile" and (out / "step_all.onnx").read_bytes() == b"graph"
    assert os.listdir(tmp_path) == ["art"]


@pytest.fixture(scope="module")
def base(artifacts, tmp_path_factory):
    """One copy of the exported var-d2-tiny artifacts; cases copy it again before corrupting."""
    d = tmp_path_factory.mktemp("rel") / "base"
    shutil.copytree(artifacts(), d)
    return d


def test_up_to_date_is_verified_and_said(cli, base, tiny, tmp_path, monkeypatch, caplog):
    art = tmp_path / "art"
    shutil.copytree(base, art)
    calls = _fake_export(monkeypatch)
    r = cli("export.py", *MODEL, "--top-k", "64", "--out", art)
    assert r.rc == 0 and "is up to date" in r.out and "wrote" not in r.out and not calls
    with open(art / "weights.bin", "r+b") as f:       # corrupted after the export
        f.seek(1000)
        f.write(b"\xff\xff")
    before = snapshot(tmp_path)         # never "up to date", and never deleted: a file of an artifact's
    line = one_line_error(cli("export.py", *MODEL, "--top-k", "64", "--out", art, "--force"),
                          "'weights.bin', whose sha256")    # name and size may be someone's
    assert "delete it yourself" in line and snapshot(tmp_path) == before and not calls
    (art / "weights.bin").unlink()      # removed by the user: the same artifacts are built again
    with caplog.at_level("WARNING"):
        res = _export(tiny, art)
    assert not res.reused and len(calls) == 1
    assert any("weights.bin is missing" in r.getMessage() and "exporting these artifacts again" in r.getMessage()
               for r in caplog.records)


def test_bench_does_not_advise_a_force_it_lacks(cli, tmp_path):
    root = tmp_path / "build"
    fake_artifacts(root / f"{TINY}-b1")
    before = snapshot(tmp_path)
    r = cli("bench.py", *MODEL, "--artifacts-root", root, "--backends", "eager")
    line = one_line_error(r, "holds other artifacts")
    assert "pass --force" not in line and "scripts/export.py --force" in line
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ 2, 3. the manifest
def _path(m, where):
    """'graphs/step/inputs/0/dtype' -> (the container, the key)."""
    *head, last = where.split("/")
    for k in head:
        m = m[int(k)] if isinstance(m, list) else m[k]
    return m, (int(last) if isinstance(m, list) else last)


def setf(where, value):
    def f(d, m):
        o, k = _path(m, where)
        o[k] = value
    return f


def delf(where):
    def f(d, m):
        o, k = _path(m, where)
        del o[k]
    return f


def _redirect_decoder(d, m):
    """A decoder.onnx from elsewhere, listed under a path that leaves the directory."""
    other = d.parent / f"{d.name}-other"
    other.mkdir()
    shutil.copy(d / "decoder.onnx", other / "decoder.onnx")
    rel = f"../{other.name}/decoder.onnx"
    m["graphs"]["decoder"]["file"] = rel
    m["files"][rel] = m["files"]["decoder.onnx"]


def _symlink_weights(d, m):
    shutil.move(d / "weights.bin", d.parent / f"{d.name}-weights.bin")
    (d / "weights.bin").symlink_to(d.parent / f"{d.name}-weights.bin")


def _fifo(name):
    def f(d, m):
        os.remove(d / name)
        os.mkfifo(d / name)
    return f


def _raw(text):
    def f(d, m):
        (d / "manifest.json").write_text(text)
        return "raw"
    return f


def _huge_manifest(d, m):
    with open(d / "manifest.json", "r+b") as f:
        f.truncate(65 << 20)            # sparse: costs no disk
    return "raw"


def _symlink_manifest(d, m):
    (d.parent / f"{d.name}-manifest.json").write_text(json.dumps(m))
    os.remove(d / "manifest.json")
    (d / "manifest.json").symlink_to(d.parent / f"{d.name}-manifest.json")
    return "raw"


def _rehash(fn):
    """Change files, then rewrite every hash (as an attacker or a careless script would)."""
    def f(d, m):
        fn(d)
        write_manifest(str(d), {k: v for k, v in m.items() if k != "files"})
        return "raw"
    return f


def _garbage_decoder(d):
    (d / "decoder.onnx").write_bytes(b"\x08\x07garbage" * 100)


def _external_escape(d):
    import onnx
    m = onnx.load(str(d / "step_all.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "location":
            e.value = "../weights.bin"
    onnx.save(m, str(d / "step_all.onnx"))


def _bad_consts(d):
    with np.load(d / "scale_consts.npz") as z:
        arrs = {k: z[k] for k in z.files}
    arrs["k0/scale_pos"] = np.zeros(7, np.int64)
    with open(d / "scale_consts.npz", "wb") as f:
        np.savez(f, **arrs)


# (case, mutation of (dir, manifest dict), message). Field names follow the schema v2.
MANIFEST_CASES = [
    ("batch-str", setf("batch", "abc"), "field 'batch' must be an integer, got 'abc'"),
    ("batch-1e9", setf("batch", 10 ** 9), "field 'batch' is 1000000000, outside 1..1024"),
    ("no-vae", delf("config/vae"), "field 'config' does not match the preset var-d2-tiny"),
    ("num-classes-1e12", setf("config/num_classes", 1e12), "field 'config' does not match the preset"),
    ("no-precision", delf("precision"), "field 'precision' is missing"),
    ("graphs-list", setf("graphs", []), "field 'graphs' must be dict, got list"),
    ("kv-float64", setf("kv/dtype", "float64"), "field 'kv.dtype' is 'float64', expected one of"),
    ("kv-not-precision", setf("kv/dtype", "float16"), "is float16, precision fp32 needs float32"),
    ("dse-empty", setf("dse", {}), "field 'dse.transform' is missing"),
    ("files-list", setf("files", []), "field 'files' must be dict, got list"),
    ("files-empty", setf("files", {}), "field 'files' does not list 'decoder.onnx'"),
    ("weights-unlisted", delf("files/weights.bin"), "field 'files' does not list 'weights.bin'"),
    ("profiles-empty", setf("graphs/step/profiles", []), "'graphs.step.profiles' are not the per-scale shapes"),
    ("label-dtype", setf("graphs/step/inputs/0/dtype", "float32"), "declares label as float32, the graph's label is int64"),
    ("seed-str", setf("weights/seed", "x"), "field 'weights.seed' must be an integer"),
    ("ckpt-int", lambda d, m: m["weights"].update(kind="checkpoint", ckpt=5), "field 'weights.ckpt' must be str"),
    ("engines-list", setf("engines", [1]), "field 'engines' must be dict"),
    ("sha-not-hex", setf("files/weights.bin/sha256", "z" * 64), "is not a sha256 hex digest"),
    ("bytes-negative", setf("files/weights.bin/bytes", -1), "outside 0.."),
    ("size-changed", lambda d, m: m["files"]["weights.bin"].update(bytes=m["files"]["weights.bin"]["bytes"] + 1),
     "the file was changed or truncated"),
    ("traversal", setf("graphs/decoder/file", "../../../../etc/passwd"), "plain names inside the artifacts directory"),
    ("absolute", setf("graphs/step/file", "/etc/passwd"), "plain names inside the artifacts directory"),
    ("foreign-decoder", _redirect_decoder, "plain names inside the artifacts directory"),
    ("nul-name", lambda d, m: m["files"].update({"a\x00b": m["files"]["weights.bin"]}), "plain names"),
    ("symlinked-weights", _symlink_weights, "weights.bin is not a regular file"),
    ("fifo-weights", _fifo("weights.bin"), "weights.bin is not a regular file"),
    ("fifo-manifest", _fifo("manifest.json"), "manifest.json is not a regular file"),
    ("symlinked-manifest", _symlink_manifest, "manifest.json is not a regular file"),
    ("manifest-65MB", _huge_manifest, "is corrupt (ValueError)"),
    ("not-json", _raw("{not json"), "is corrupt (JSONDecodeError)"),
    ("json-list", _raw("[]"), "is not a var-ssg manifest"),
    ("format-v1", setf("format_version", 1), "format version 1, this runtime reads 2: re-export"),
]
# Files changed and every hash rewritten: caught where the file is used.
BACKEND_CASES = [
    ("garbage-graph", _rehash(_garbage_decoder), "not a readable ONNX graph"),
    ("external-data-escapes", _rehash(_external_escape), "reads '../weights.bin', not the artifacts' weights.bin"),
    ("consts-wrong-shape", _rehash(_bad_consts), "k0/scale_pos has shape [7], expected [1]"),
]


def _corrupt(base, tmp_path, case, mutate):
    d = tmp_path / case
    shutil.copytree(base, d)
    m = json.loads((d / "manifest.json").read_text())
    if mutate(d, m) != "raw" and (d / "manifest.json").is_file() and not (d / "manifest.json").is_symlink():
        (d / "manifest.json").write_text(json.dumps(m))
    return d


@pytest.mark.parametrize("case,mutate,msg", MANIFEST_CASES + BACKEND_CASES, ids=[c[0] for c in MANIFEST_CASES + BACKEND_CASES])
def test_malformed_artifacts(cli, base, tmp_path, no_hang, case, mutate, msg):
    d = _corrupt(base, tmp_path, case, mutate)
    if (case, mutate, msg) in MANIFEST_CASES:
        with pytest.raises(ManifestError, match=re.escape(msg)) as e:
            load_manifest(str(d))
        assert msg in str(e.value) and len(str(e.value).splitlines()) == 1
    before = snapshot(tmp_path)
    r = cli("generate.py", "--backend", "onnxruntime", "--artifacts", d, "--out", tmp_path / "x.png")
    one_line_error(r, msg)
    assert snapshot(tmp_path) == before         # no PNG, nothing else written


def test_every_script_refuses_a_huge_batch(cli, base, tmp_path):
    """batch 10**9 once made parity and bench build a 10**9-element list (OOM killer)."""
    d = _corrupt(base, tmp_path, "huge", setf("batch", 10 ** 9))
    for script, args in [("parity.py", ["--artifacts", d]), ("bench.py", ["--artifacts", d, "--backends", "eager"]),
                         ("lint.py", [d]), ("generate.py", ["--artifacts", d, "--out", tmp_path / "x.png"])]:
        one_line_error(cli(script, *args), "outside 1..1024")


def test_engine_entries_as_trt_build_writes_them_load(base, tmp_path):
    """`--target trt` manifests (engines from export.trt_build.plan) pass the stricter schema;
    an engine file outside the directory does not."""
    from dataclasses import asdict
    from var_ssg.export.trt_build import plan
    d = tmp_path / "trt"
    shutil.copytree(base, d)
    m = json.loads((d / "manifest.json").read_text())
    m["engines"] = {p.name: asdict(p) for p in plan(m)}
    m["tensorrt"] = dict(version="10.13.0.35", gpu="NVIDIA H200", compute_capability="9.0",
                         hardware_compatible=False, version_compatible=False, timing_cache="timing.cache", key="k")
    for e in m["engines"].values():
        (d / e["file"]).write_bytes(b"engine")
    write_manifest(str(d), {k: v for k, v in m.items() if k != "files"})
    man = load_manifest(str(d))
    assert man.path(man.engines["step"]["file"]) == str(d / "step_all.plan")
    m["engines"]["decoder"]["file"] = "../decoder.plan"
    write_manifest(str(d), {k: v for k, v in m.items() if k != "files"})
    with pytest.raises(ManifestError, match="'engines.decoder.file' is '../decoder.plan': artifact files are plain"):
        load_manifest(str(d))


def test_runtime_opens_only_listed_files(base):
    man = load_manifest(str(base))
    for rel in ("../manifest.json", "/etc/passwd", "manifest.json", "notes.txt"):
        with pytest.raises(ManifestError, match="is not listed in manifest.json"):
            man.path(rel)


# ------------------------------------------------------------------------------ 4. outputs
@pytest.mark.parametrize("case,msg", [
    ("out-is-dir", "--out {t}/d.png is a directory"),
    ("out-missing-dir", "directory {t}/nope does not exist"),
    ("out-not-png", "--out must be a .png file"),
    ("out-name-too-long", "file name too long"),
    ("tokens-same-as-out", "--save-tokens and --out are the same file"),
    ("tokens-missing-dir", "--save-tokens {t}/nope/t.json: directory"),
    ("tokens-fifo", "--save-tokens {t}/fifo exists and is not a regular file"),
    ("tokens-over-ckpt", "would overwrite an input"),
    ("out-into-artifacts", "would overwrite an input"),
])
def test_output_paths_are_checked_before_the_work(cli, tmp_path, no_hang, case, msg):
    t = tmp_path
    (t / "d.png").mkdir()
    (t / "old.png").write_bytes(b"old image")
    os.mkfifo(t / "fifo")
    (t / "ck.pth").write_bytes(b"weights")
    (t / "art").mkdir()
    out, extra = t / "old.png", []
    if case == "out-is-dir":
        out = t / "d.png"
    elif case == "out-missing-dir":
        out = t / "nope" / "x.png"
    elif case == "out-not-png":
        out = t / "x.jpg"
    elif case == "out-name-too-long":
        out = t / ("x" * 300 + ".png")
    elif case == "tokens-same-as-out":
        extra = ["--save-tokens", t / "old.png"]
    elif case == "tokens-missing-dir":
        extra = ["--save-tokens", t / "nope" / "t.json"]
    elif case == "tokens-fifo":
        extra = ["--save-tokens", t / "fifo"]
    elif case == "tokens-over-ckpt":
        extra = ["--ckpt", t / "ck.pth", "--vae-ckpt", t / "ck.pth", "--save-tokens", t / "ck.pth"]
    else:
        extra = ["--artifacts", t / "art"]
        out = t / "art" / "x.png"
    before = snapshot(t)
    args = ["--model", TINY] + ([] if "--ckpt" in extra else ["--random-init", "0"])
    one_line_error(cli("generate.py", *args, "--out", out, *extra), msg.format(t=t))
    assert snapshot(t) == before


@pytest.mark.parametrize("script,args,msg", [
    ("parity.py", ["--artifacts", "{t}/art", "--json", "{t}/nope/p.json"], "--json {t}/nope/p.json: directory"),
    ("parity.py", ["--artifacts", "{t}/art", "--json", "{t}"], "is a directory"),
    ("bench.py", ["--artifacts", "{t}/art", "--json", "{t}/b.json", "--plot", "{t}/b.json"], "--plot must be a .png file"),
    ("bench.py", ["--artifacts", "{t}/art", "--plot", "{t}/nope/b.png"], "--plot {t}/nope/b.png: directory"),
    ("bench.py", ["--artifacts", "{t}/art", "--json", "{t}/" + "j" * 300], "file name too long"),
    ("generate.py", ["--artifacts", "{t}/f.txt"], "artifacts directory {t}/f.txt is not a directory"),
])
def test_report_paths_are_checked_before_the_work(cli, tmp_path, script, args, msg):
    (tmp_path / "f.txt").write_text("x")
    before = snapshot(tmp_path)
    one_line_error(cli(script, *[a.format(t=tmp_path) for a in args]), msg.format(t=tmp_path))
    assert snapshot(tmp_path) == before


def test_out_of_memory_is_one_line_and_a_bug_is_a_traceback(cli, tmp_path, monkeypatch):
    from var_ssg.runtime import pipeline
    for exc in (MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")):
        def run(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(pipeline.Pipeline, "run", run)
        one_line_error(cli("generate.py", *MODEL, "--out", tmp_path / "x.png"), "out of memory")
    monkeypatch.setattr(pipeline.Pipeline, "run", lambda *a, **k: {}["a bug"])
    with pytest.raises(KeyError, match="a bug"):      # a real bug is not dressed up as a user error
        cli("generate.py", *MODEL, "--out", tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fail", ["png", "tokens"])
def test_disk_full_while_writing_leaves_the_old_files(cli, tmp_path, monkeypatch, fail):
    """Disk full while writing the PNG (or the tokens after it): one line, exit 2, the previous
    PNG untouched, no tokens file, no temporary file."""
    import PIL.Image
    from var_ssg.common import files

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    if fail == "png":
        monkeypatch.setattr(PIL.Image.Image, "save", full)
    else:
        monkeypatch.setattr(files.json, "dump", full)
    (tmp_path / "x.png").write_bytes(b"old image")
    before = snapshot(tmp_path)
    r = cli("generate.py", *MODEL, "--class", "3", "--top-k", "10", "--out", tmp_path / "x.png",
            "--save-tokens", tmp_path / "t.json")
    one_line_error(r, "No space left on device")
    assert snapshot(tmp_path) == before


def test_outputs_are_written_together(cli, tmp_path):
    (tmp_path / "x.png").write_bytes(b"old image")
    r = cli("generate.py", *MODEL, "--class", "3", "--top-k", "10", "--out", tmp_path / "x.png",
            "--save-tokens", tmp_path / "t.json")
    assert r.rc == 0, r.err
    assert sorted(os.listdir(tmp_path)) == ["t.json", "x.png"]
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG" and json.loads((tmp_path / "t.json").read_text())["tokens"]


# ------------------------------------------------------------------------------ 5, 6. numbers and checkpoints
@pytest.mark.parametrize("script,args,msg", [
    ("generate.py", ["--temperature", "1e-300"], "--temperature must be in 0.0001..10000"),
    ("generate.py", ["--temperature", "1e300"], "--temperature must be in 0.0001..10000"),
    ("generate.py", ["--cfg", "1e300"], "argument --cfg: must be within -10000..10000"),
    ("generate.py", ["--ssg-beta", "1e300"], "SSG beta values must be within -10000..10000"),
    ("generate.py", ["--seed", str(2 ** 64)], "argument --seed: must be an integer in 0..9223372036854775807"),
    ("generate.py", ["--seed", "-1"], "argument --seed: must be an integer in 0..9223372036854775807"),
    ("generate.py", ["--random-init", str(2 ** 64)], "argument --random-init: must be an integer in 0.."),
    ("export.py", ["--random-init", str(2 ** 64), "--out", "{t}/a"], "argument --random-init: must be an integer"),
    ("export.py", ["--top-k", "-1", "--out", "{t}/a"], "--top-k must be >= 0"),
    ("export.py", ["--batch", str(10 ** 9), "--out", "{t}/a"], "--batch must be in 1..1024"),
])
def test_numbers_out_of_range(cli, tmp_path, script, args, msg):
    base_args = ["--model", TINY] + ([] if "--random-init" in args else ["--random-init", "0"])
    r = cli(script, *base_args, *[a.format(t=tmp_path) for a in args],
            *(["--out", tmp_path / "x.png"] if script == "generate.py" else []))
    one_line_error(r, msg)
    assert os.listdir(tmp_path) == []


def test_library_ranges():
    from var_ssg.graphs.weights import random_state_dicts
    for bad in (1e-300, 1e300, float("nan"), 0.0):
        with pytest.raises(ConfigError, match="--temperature must be in"):
            SamplerConfig(temperature=bad)
    with pytest.raises(ConfigError, match="--cfg must be within"):
        check_guidance(1e300)
    with pytest.raises(ConfigError, match="beta values must be within"):
        SSGConfig(betas=(1e300,) * 9)
    for bad in (-1, 2 ** 63, 1.5, True):
        with pytest.raises(ConfigError, match=r"must be an integer in 0..9223372036854775807"):
            check_seed(bad)
    with pytest.raises(ConfigError, match="seed must be an integer"):
        random_state_dicts(get_preset(TINY), 2 ** 64)
    assert check_seed(2 ** 63 - 1) == 2 ** 63 - 1 and check_guidance(-1e4) == -1e4


class _Code:
    """Pickled as a call to Path.touch(marker): loading it would run code."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("case,msg", [
    ("empty", "cannot be read (EOFError); the file is empty"),
    ("pickled-code", "holds pickled objects other than tensors (possibly code); refusing to load it"),
    ("fifo", "not a regular file"),
    ("folder", "not a regular file"),
])
def test_bad_checkpoints(cli, tmp_path, no_hang, case, msg):
    ck = tmp_path / "ck.pth"
    if case == "empty":
        ck.write_bytes(b"")
    elif case == "pickled-code":
        torch.save({"w": _Code(tmp_path / "PWNED")}, ck)
    elif case == "fifo":
        os.mkfifo(ck)
    else:
        ck.mkdir()
    before = snapshot(tmp_path)
    r = cli("generate.py", "--model", TINY, "--ckpt", ck, "--vae-ckpt", ck, "--out", tmp_path / "x.png")
    line = one_line_error(r, msg)
    assert "weights_only=False" not in line and not (tmp_path / "PWNED").exists()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case,msg", [
    ("text", "not an ONNX model (DecodeError)"),
    ("empty", "not an ONNX model (no IR version or no nodes)"),
    ("fifo", "cannot be read (not a regular file)"),
    ("bad-manifest", "manifest.json is corrupt"),
    ("missing", "no such file or directory"),
])
def test_lint_bad_inputs(cli, tmp_path, no_hang, case, msg):
    p = tmp_path / "g.onnx"
    if case == "text":
        p.write_text("hello, not a graph\n")
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "fifo":
        os.mkfifo(p)
    elif case == "bad-manifest":
        p = tmp_path / "art"
        p.mkdir()
        (p / "manifest.json").write_text('{"graphs": {"step": {}}')
    one_line_error(cli("lint.py", p), msg)


@pytest.mark.slow
def test_force_on_user_files_as_a_real_process(tmp_path):
    """The headline case through the real entry point: a separate process, exit 2, one line."""
    d = user_dir(tmp_path)
    before = snapshot(tmp_path)
    r = run_script("export.py", *MODEL, "--out", d, "--force")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --out") and "not var-ssg artifacts" in r.stderr
    assert snapshot(tmp_path) == before
