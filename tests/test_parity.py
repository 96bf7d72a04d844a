"""Teacher-forced parity on the real vocabulary (var-d2: the official VQVAE shape, V = 4096):
it passes on correct artifacts with every flip explained, and it catches a wrong graph
(weights off by 1%, a sampler whose top-p is off) with the scale and the measure named."""
import json
import shutil

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import numpy_helper

from contract.manifest import write_manifest
from tests.conftest import run_script

pytestmark = pytest.mark.slow
ARGS = ["--class", "11", "907", "--ssg-beta", "linear:0.8,0.2"]


@pytest.fixture(scope="module")
def d2(tmp_path_factory):
    """var-d2 artifacts (batch 2), one per DSE transform, exported once."""
    from export.onnx_export import ExportConfig, export_artifacts
    from graphs.config import get_preset
    from graphs.weights import WeightSource, random_models
    made = {}

    def make(transform):
        if transform not in made:
            var, vae = random_models(get_preset("var-d2"), 0)
            out = str(tmp_path_factory.mktemp("d2") / transform)
            export_artifacts(var, vae, WeightSource(kind="random", seed=0), out, ExportConfig(batch=2, transform=transform))
            made[transform] = out
        return made[transform]
    return make


@pytest.mark.parametrize("transform,seeds", [("dct", "0-2"), ("dft", "3-5")])     # 6 seeds, 12 images
def test_parity_passes_on_v4096_with_explained_flips(d2, tmp_path, transform, seeds):
    js = tmp_path / "p.json"
    r = run_script("parity.py", "--artifacts", d2(transform), *ARGS, "--seeds", seeds, "--json", js)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    runs = json.loads(js.read_text())
    assert len(runs) == 3 and all(x["ok"] and x["mode"] == "teacher-forced" and len(x["rows"]) == 10 for x in runs)
    assert all(row["logits_rel"] <= 1e-4 and row["logits_cfg_rel"] <= 1e-4 for x in runs for row in x["rows"])
    flips = [f for x in runs for f in x["flips"]]
    assert all(f["explained"] for f in flips)
    assert "parity OK" in r.stdout and f"{len(flips)} token flips, {len(flips)} explained" in r.stdout
    for f in flips:                                          # the table shows each one
        assert f"flip scale {f['scale']} row {f['row']} pos {f['pos']}" in r.stdout


def _rehash(d):
    man = json.loads((d / "manifest.json").read_text())
    write_manifest(str(d), {k: v for k, v in man.items() if k != "files"})


def test_weights_off_by_one_percent_fail_naming_scale_and_measure(d2, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(d2("dct"), bad)
    m = onnx.load(str(bad / "step_all.onnx"), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == "var.blocks.1.ada_lin.1.weight")   # one block's AdaLN
    ext = {e.key: e.value for e in t.external_data}
    off, n = int(ext["offset"]), int(ext["length"])
    raw = bytearray((bad / "weights.bin").read_bytes())
    w = np.frombuffer(bytes(raw[off:off + n]), dtype=np.float32) * np.float32(1.01)
    raw[off:off + n] = w.tobytes()
    (bad / "weights.bin").write_bytes(bytes(raw))
    _rehash(bad)                                  # a wrong graph that passes the hash check
    r = run_script("parity.py", "--artifacts", bad, *ARGS, "--seeds", "0")
    assert r.returncode == 1
    assert "scale 0: CFG logits max|d|/max|ref|" in r.stderr and "> 0.0001 (fp32 bound)" in r.stderr


def test_sampler_with_top_p_off_is_caught_as_unexplained_flips(d2, tmp_path):
    """The graph's nucleus uses 0.7 * top_p: logits agree, tokens do not, and the flips are not
    near-ties."""
    bad = tmp_path / "topp"
    shutil.copytree(d2("dct"), bad)
    m = onnx.load(str(bad / "step_all.onnx"), load_external_data=False)
    for node in m.graph.node:
        node.input[:] = ["top_p_planted" if i == "top_p" else i for i in node.input]
    m.graph.initializer.append(numpy_helper.from_array(np.array([0.7], np.float32), "planted_factor"))
    m.graph.node.insert(0, oh.make_node("Mul", ["top_p", "planted_factor"], ["top_p_planted"], name="planted"))
    onnx.save(m, str(bad / "step_all.onnx"))
    _rehash(bad)
    js = tmp_path / "p.json"
    r = run_script("parity.py", "--artifacts", bad, *ARGS, "--seeds", "0", "--json", js)
    assert r.returncode == 1 and "unexplained token flips" in r.stderr
    rep = json.loads(js.read_text())[0]
    assert all(row["logits_rel"] <= 1e-4 for row in rep["rows"])            # the logits agree
    assert all("unexplained" in f for f in rep["failures"])


def test_more_smooth_and_unconditional_under_parity(d2):
    r = run_script("parity.py", "--artifacts", d2("dct"), "--class", "-1", "5", "--more-smooth", "--seeds", "3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "parity OK" in r.stdout


def test_free_running_is_a_report(d2):
    r = run_script("parity.py", "--artifacts", d2("dct"), *ARGS, "--seeds", "4", "--free-running")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "free-running" in r.stdout and "images equal" in r.stdout and "PSNR" in r.stdout


def test_artifacts_without_the_forcing_input_say_reexport(d2, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(d2("dct"), old)
    man = json.loads((old / "manifest.json").read_text())
    man["graphs"]["step"]["inputs"] = [i for i in man["graphs"]["step"]["inputs"] if i["name"] not in ("forced", "force")]
    (old / "manifest.json").write_text(json.dumps(man))
    r = run_script("parity.py", "--artifacts", old, "--seeds", "0")
    assert r.returncode == 2 and "re-export" in r.stderr and len(r.stderr.strip().splitlines()) == 1
