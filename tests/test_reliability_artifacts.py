"""Artifacts that are hash-valid (every hash rewritten) but wrong inside: refused when they are
loaded, by every command that opens them, with one `error:` line and exit 2. What the hashes do
and do not promise: DESIGN.md "What the hashes promise"."""
import io
import json
import shutil
import tracemalloc
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper as oh, numpy_helper

from var_ssg.contract.manifest import ManifestError, load_manifest, write_manifest
from tests.test_reliability_inputs import cli, one_line_error


@pytest.fixture(scope="module")
def base(artifacts, tmp_path_factory):
    d = tmp_path_factory.mktemp("hv") / "base"
    shutil.copytree(artifacts(), d)
    return d


def _rehash(d, edit_manifest=None):
    m = json.loads((d / "manifest.json").read_text())
    if edit_manifest:
        edit_manifest(m)
    write_manifest(str(d), {k: v for k, v in m.items() if k != "files"})


def _consts(d):
    with np.load(d / "scale_consts.npz") as z:
        return {k: z[k] for k in z.files}


def _save_consts(d, arrs):
    with open(d / "scale_consts.npz", "wb") as f:
        np.savez(f, **arrs)


def _with_raw_member(d, key, header: bytes, body: bytes):
    """scale_consts.npz with member `key` replaced by a hand-written .npy (any header)."""
    arrs = _consts(d)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in arrs.items():
            if k != key:
                b = io.BytesIO()
                np.save(b, v)
                z.writestr(k + ".npy", b.getvalue())
        z.writestr(key + ".npy", header + body)
    (d / "scale_consts.npz").write_bytes(buf.getvalue())


def _npy_header(descr: str, shape) -> bytes:
    from numpy.lib import format as npy
    b = io.BytesIO()
    npy.write_array_header_1_0(b, dict(descr=descr, fortran_order=False, shape=tuple(shape)))
    return b.getvalue()


def _edit_graph(d, file, fn):
    m = onnx.load(str(d / file), load_external_data=False)
    fn(m)
    onnx.save(m, str(d / file))


# ------------------------------------------------------------------------------ mutations
def consts_dtype(descr):
    def f(d):
        arrs = _consts(d)
        arrs["k0/scale_level"] = np.zeros(1, dtype=descr)
        _save_consts(d, arrs)
    return f


def consts_out_of_range(d):
    arrs = _consts(d)
    arrs["k5/scale_pos"] = arrs["k5/scale_pos"] + 10 ** 6          # GatherND invalid index in ONNX Runtime
    _save_consts(d, arrs)


def consts_dft_under_dct(d):
    from var_ssg.graphs.config import get_preset
    from var_ssg.graphs.io import scale_constants
    arrs = _consts(d)
    cfg = get_preset("var-d2-tiny")
    for k in range(cfg.num_scales):
        arrs[f"k{k}/scale_dse"] = scale_constants(cfg, "dft", k)["scale_dse"]
    _save_consts(d, arrs)


def topk_8(d):
    def f(m):
        node = next(n for n in m.graph.node if n.op_type == "TopK")
        t = next(t for t in m.graph.initializer if t.name == node.input[1])
        t.CopyFrom(numpy_helper.from_array(np.array([8], dtype=numpy_helper.to_array(t).dtype).reshape(
            numpy_helper.to_array(t).shape), t.name))
    _edit_graph(d, "step_all.onnx", f)


def batch2_step(d):
    def f(m):
        for v in list(m.graph.input) + list(m.graph.output):
            dims = v.type.tensor_type.shape.dim
            i = 3 if v.name in ("past_kv", "new_kv") else 0
            if v.name not in ("scale_first", "scale_level", "scale_t", "scale_phi", "scale_pos", "scale_down",
                              "scale_up", "scale_dse") and dims[i].HasField("dim_value"):
                dims[i].dim_value *= 2
    _edit_graph(d, "step_all.onnx", f)


def constant_from_unlisted_file(d):
    """A Constant node whose value is external data in unlisted.bin, added to the image."""
    np.full(1, 0.5, np.float32).tofile(d / "unlisted.bin")

    def f(m):
        last = next(n for n in m.graph.node if "image" in n.output)
        last.output[list(last.output).index("image")] = "image_pre"
        t = onnx.TensorProto(name="c", data_type=onnx.TensorProto.FLOAT, dims=[1],
                             data_location=onnx.TensorProto.EXTERNAL)
        for k, v in (("location", "unlisted.bin"), ("offset", "0"), ("length", "4")):
            t.external_data.add(key=k, value=v)
        m.graph.node.extend([oh.make_node("Constant", [], ["c"], value=t), oh.make_node("Add", ["image_pre", "c"], ["image"])])
    _edit_graph(d, "decoder.onnx", f)
    (d / "unlisted.bin").unlink()               # listed nowhere; made again after the rehash


def nan_weights(d):
    m = onnx.load(str(d / "step_all.onnx"), load_external_data=False)
    t = max((t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL),
            key=lambda t: int(np.prod(t.dims)))
    off = int({e.key: e.value for e in t.external_data}["offset"])
    with open(d / "weights.bin", "r+b") as f:
        f.seek(off + 40)
        f.write(np.array([np.nan], np.float32).tobytes())


def nan_inline(d):
    def f(m):
        t = next(t for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                 and t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) > 4)
        a = numpy_helper.to_array(t).copy()
        a.reshape(-1)[1] = np.inf
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    _edit_graph(d, "step_all.onnx", f)


CASES = [  # (case, file mutation, manifest mutation, message)
    ("consts-U1", consts_dtype("<U1"), None, "k0/scale_level has dtype <U1, expected int64"),
    ("consts-V8", consts_dtype("V8"), None, "k0/scale_level has dtype |V8, expected int64"),
    ("consts-out-of-range", consts_out_of_range, None, "k5/scale_pos does not hold the values var-d2-tiny with DSE dct"),
    ("dft-under-dct", consts_dft_under_dct, None, "/scale_dse does not hold the values var-d2-tiny with DSE dct"),
    ("topk-8-graph", topk_8, None, "sampler keeps top-k [8] (TopK K), the manifest's sampler.k_max is 64"),
    ("k-max-below-graph", None, lambda m: m["sampler"].update(k_max=32, top_k_requested=32), "the manifest's sampler.k_max is 32"),
    ("batch-2-step", batch2_step, None, "input label has shape [2], the manifest says [1]"),
    ("decoder-is-step", None, lambda m: m["graphs"]["decoder"].update(file="step_all.onnx"), "names one file for two roles"),
    ("constant-external", constant_from_unlisted_file, None, "reads 'unlisted.bin', not the artifacts' weights.bin"),
    ("nan-weights", nan_weights, None, "holds NaN or infinite values"),
    ("inf-inline", nan_inline, None, "holds NaN or infinite values"),
]


def _make(base, tmp_path, case, files, manifest):
    d = tmp_path / case
    shutil.copytree(base, d)
    if files:
        files(d)
    _rehash(d, manifest)
    if case == "constant-external":
        np.full(1, 0.5, np.float32).tofile(d / "unlisted.bin")
    return d


@pytest.mark.parametrize("case,files,manifest,msg", CASES, ids=[c[0] for c in CASES])
def test_hash_valid_but_wrong_artifacts(capsys, base, tmp_path, case, files, manifest, msg):
    d = _make(base, tmp_path, case, files, manifest)
    one_line_error(cli(capsys, "generate", "--backend", "onnxruntime", "--artifacts", d, "--class", "3",
                       "--out", tmp_path / "x.png"), msg)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command,args", [("parity", []), ("bench", ["--backends", "onnxruntime"])])
def test_parity_and_bench_refuse_them_too(capsys, base, tmp_path, command, args):
    d = _make(base, tmp_path, "oor", consts_out_of_range, None)
    one_line_error(cli(capsys, command, "--artifacts", d, *args), "k5/scale_pos does not hold the values")


def test_a_huge_dtype_is_refused_before_reading(base, tmp_path):
    """A member whose header claims |V400000000 (400 MB for shape [1]): refused from the header,
    nothing allocated."""
    d = tmp_path / "huge"
    shutil.copytree(base, d)
    _with_raw_member(d, "k0/scale_first", _npy_header("|V400000000", [1]), b"\0" * 64)
    _rehash(d)
    man = load_manifest(str(d))
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError, match=r"k0/scale_first has dtype \|V400000000, expected float32"):
            man.scale_consts()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20, peak


@pytest.mark.parametrize("case,files,manifest,msg", CASES, ids=[c[0] for c in CASES])
def test_serve_refuses_them_before_ray_starts(capsys, base, tmp_path, monkeypatch, case, files, manifest, msg):
    """serve.py ran only the file hashes before Ray: bad artifacts started Ray and ended ~17 s
    later in "Deploying application var-ssg failed". Now generate's line, and Ray never starts."""
    from var_ssg.cluster.ray_session import RaySession

    def no_ray(*a, **kw):
        raise AssertionError("Ray was started for artifacts the driver could have refused")
    monkeypatch.setattr(RaySession, "start", no_ray)
    d = _make(base, tmp_path, case, files, manifest)
    one_line_error(cli(capsys, "serve", "--artifacts", d, "--port", "8"), msg)


def test_a_replicas_start_up_error_is_its_own_line():
    """What Serve's status says of a replica that raised in its constructor, cut to the line
    generate.py prints."""
    from var_ssg.serving.launch import user_error_line
    ray_text = ("The deployment failed to start 3 times in a row. This may be due to a problem with its "
                "constructor or initial health check failing. See controller logs for details. Error:\n"
                "ray::ServeReplica:var-ssg:Model.initialize_and_get_metadata() (pid=123, ip=127.0.0.1)\n"
                "  File \"/x/runtime/backends/ort.py\", line 181, in _share\n"
                "    check_graph(self.man, name, m, path)\n"
                "contract.manifest.ManifestError: /a/step_all.onnx: sampler keeps top-k [8] (TopK K), the "
                "manifest's sampler.k_max is 64; re-export with --force")
    assert user_error_line(ray_text) == ("/a/step_all.onnx: sampler keeps top-k [8] (TopK K), the manifest's "
                                         "sampler.k_max is 64; re-export with --force")
    assert user_error_line("RuntimeError: Deploying application var-ssg failed") is None
