"""Infinity's parity has teeth on bitwise bugs: four plausible export bugs, planted in exported
infinity-tiny artifacts (the graph or the weights it reads, the manifest's hashes rewritten so
the artifacts load), are each caught by `parity.py --artifacts DIR --backends eager,onnxruntime
--prompt ...` with the scale and the measure named; the unmodified artifacts pass on 6 seeds
(DESIGN.md "Infinity")."""
import json
import re
import shutil

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import numpy_helper

from var_ssg.contract.manifest import write_manifest
from tests.test_infinity_export import _t5

pytestmark = pytest.mark.slow
TINY = "infinity-tiny"
PROMPT = ["--prompt", "a cat on the red chair"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    from var_ssg.graphs.infinity_config import get_infinity_preset
    from var_ssg.tools.commands.export import main
    root = tmp_path_factory.mktemp("infmut")
    out = str(root / "art")
    assert main(["--model", TINY, "--random-init", "0", "--out", out]) == 0
    return out, _t5(root / "t5", get_infinity_preset(TINY).text_dim)


def _graph(d):
    return onnx.load(str(d / "step_all.onnx"), load_external_data=False)


def _rewire(m, old, new):
    for n in m.graph.node:
        if not n.name.startswith("planted"):
            n.input[:] = [new if i == old else i for i in n.input]


def _head(m):
    """The bit head's (weight C x V, bias V) initializers: the MatMul feeding model.head.bias."""
    add = next(n for n in m.graph.node if "model.head.bias" in n.input)
    made = {o: n for n in m.graph.node for o in n.output}
    init = {t.name: t for t in m.graph.initializer}
    mm = next(made[i] for i in add.input if i in made)
    return next(init[i] for i in mm.input if i in init), init["model.head.bias"]


def _permute_head(d, perm):
    """Reorder the head's V = 2·d outputs (logit 2j, 2j+1 of bit j): in weights.bin, or in the
    graph for a tensor small enough to be stored inline."""
    raw = bytearray((d / "weights.bin").read_bytes())
    m = _graph(d)
    for t in _head(m):
        ext = {e.key: e.value for e in t.external_data}
        if "offset" not in ext:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(t)[..., perm]), t.name))
            continue
        off, n = int(ext["offset"]), int(ext["length"])
        a = np.frombuffer(bytes(raw[off:off + n]), np.float32).reshape(tuple(t.dims))
        raw[off:off + n] = np.ascontiguousarray(a[..., perm]).tobytes()
    (d / "weights.bin").write_bytes(bytes(raw))
    return m


def bit_order_reversed(d):
    """Bit j's logit pair read as bit d-1-j's (a head exported in reversed bit order)."""
    V = _head(_graph(d))[1].dims[0]
    return _permute_head(d, np.arange(V).reshape(-1, 2)[::-1].reshape(-1))


SWAPPED_BIT = 3


def one_pair_swapped(d):
    """One bit's (logit of 0, logit of 1) swapped: that bit alone is drawn inverted."""
    V = _head(_graph(d))[1].dims[0]
    perm = np.arange(V)
    perm[[2 * SWAPPED_BIT, 2 * SWAPPED_BIT + 1]] = perm[[2 * SWAPPED_BIT + 1, 2 * SWAPPED_BIT]]
    return _permute_head(d, perm)


def text_mask_dropped(d):
    """Cross-attention attends the padding: the step graph's text mask is all ones."""
    m = _graph(d)
    _rewire(m, "text_mask2", "text_mask2_planted")
    m.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "planted_one"))
    m.graph.node.insert(0, oh.make_node("Max", ["text_mask2", "planted_one"], ["text_mask2_planted"],
                                        name="planted_mask"))
    return m


def rope_off_by_one(d):
    """RoPE positions shifted by one token: token i rotated by token i-1's angles (rows rolled)."""
    m = _graph(d)
    for name in ("scale_cos", "scale_sin"):
        _rewire(m, name, f"{name}_planted")
        for part, (s, e) in (("last", (-1, 2 ** 62)), ("head", (0, -1))):
            consts = [(f"planted_{name}_{part}_{x}", np.array([v], np.int64)) for x, v in (("s", s), ("e", e), ("a", 0))]
            for cn, v in consts:
                m.graph.initializer.append(numpy_helper.from_array(v, cn))
            m.graph.node.insert(0, oh.make_node("Slice", [name] + [c for c, _ in consts], [f"{name}_{part}"],
                                                name=f"planted_{name}_{part}"))
        m.graph.node.insert(2, oh.make_node("Concat", [f"{name}_last", f"{name}_head"], [f"{name}_planted"],
                                            name=f"planted_{name}_roll", axis=0))
    return m


# mutant -> (plant, the measure the failure must name, the first scale it must fail at)
MUTANTS = {
    "bit order reversed": (bit_order_reversed, "CFG bit logits", 0),
    "one bit's logit pair swapped": (one_pair_swapped, "CFG bit logits", 0),
    "text mask dropped": (text_mask_dropped, "CFG bit logits", 0),
    "RoPE off by one": (rope_off_by_one, "CFG bit logits", 1),     # scale 0 is one token: nothing to shift
}


def _plant(src, name, tmp_path):
    d = tmp_path / "mutant"
    shutil.copytree(src, d)
    m = MUTANTS[name][0](d)
    if m is not None:
        onnx.save(m, str(d / "step_all.onnx"))
        onnx.checker.check_model(str(d / "step_all.onnx"))
    man = json.loads((d / "manifest.json").read_text())
    write_manifest(str(d), {k: v for k, v in man.items() if k != "files"})      # hashes that match
    return d


def _parity(art, t5, tmp_path, seeds):
    from var_ssg.tools.commands.parity import main
    js = tmp_path / "parity.json"
    rc = main(["--artifacts", str(art), "--backends", "eager,onnxruntime", *PROMPT, "--text-encoder", t5,
               "--seeds", seeds, "--ssg-beta", "0.5", "--aspect-ratio", "3:4", "--json", str(js)])
    return rc, json.loads(js.read_text())


@pytest.mark.parametrize("name", list(MUTANTS))
def test_planted_bitwise_mutant_is_caught_by_parity(clean, tmp_path, name):
    _, measure, first = MUTANTS[name]
    rc, rep = _parity(_plant(clean[0], name, tmp_path), clean[1], tmp_path, "0")
    assert rc == 1 and rep["failures"], f"{name} passed parity"
    hit = [f for f in rep["failures"] if measure in f]
    assert hit, f"{name}: no failure names {measure!r}: {rep['failures']}"
    scales = sorted(int(re.search(r"scale (\d+): ", f).group(1)) for f in hit)
    assert scales[0] == first, (name, rep["failures"])


def test_unmodified_artifacts_pass_parity_on_six_seeds(clean, tmp_path):
    rc, rep = _parity(clean[0], clean[1], tmp_path, "0-5")
    assert rc == 0 and rep["failures"] == [] and len(rep["runs"]) == 6
    for run in rep["runs"]:
        assert all(s["logits_cfg_rel"] <= 1e-4 and s["unexplained"] == 0 for s in run["scales"]), run
