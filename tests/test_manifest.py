"""The manifest schema, once (contract.manifest): what build_manifest writes is exactly what the
validator checks. Built from the components alone: no export needed."""
import copy

import pytest

from var_ssg.contract.dtypes import dtype_name_of
from var_ssg.contract.manifest import ManifestError, build_manifest, check_manifest
from var_ssg.graphs.components import DecoderComponent, StepComponent
from var_ssg.graphs.config import get_preset, topk_bake
from var_ssg.graphs.step import StepSpec
from tests.conftest import TINY


def _io(names, feeds, shapes, dtypes=None, per_scale=None):
    """As the exporter declares them: a dimension that differs between scales is symbolic (a name)."""
    def dims(n):
        got = list(shapes[n])
        if per_scale:
            got = [d if len({s[n][a] for s in per_scale}) == 1 else f"s{n}{a}" for a, d in enumerate(got)]
        return got
    return [dict(name=n, shape=dims(n), dtype=(dtypes or {}).get(n) or dtype_name_of(feeds[n].dtype)) for n in names]


def built(**kw):
    cfg = get_preset(TINY)
    args = dict(batch=1, precision="fp32", opset=18, transform="dct", top_k=64)
    args.update(kw)
    step = StepComponent(cfg, args["batch"], StepSpec(transform=args["transform"], k_max=topk_bake(args["top_k"], cfg.V)))
    dec = DecoderComponent(cfg, args["batch"])
    k = step.example_scale()
    feeds = step.example_feeds(k)
    profiles = [step.profile(j) for j in range(cfg.num_scales)]
    out_dtypes = dict(tokens="int64", new_kv="float32")
    return build_manifest(
        cfg, **args, weights=dict(kind="random", seed=0),
        external_data=dict(file="weights.bin", bytes=10, referenced_bytes=10, parameter_bytes=10),
        step=dict(file=step.file, inputs=_io(step.inputs, feeds, step.profile(k), per_scale=profiles),
                  outputs=_io(step.outputs, {}, step.output_shapes(k), {n: out_dtypes.get(n, "float32") for n in step.outputs},
                              per_scale=[step.output_shapes(j) for j in range(cfg.num_scales)])),
        decoder=dict(file=dec.file, inputs=_io(dec.inputs, dec.example_feeds(), dict(f_hat=step.profile(0)["f_hat"])),
                     outputs=[dict(name="image", shape=[1, 3, 16 * 16, 16 * 16], dtype="float32")]),
        consts=step.consts_file, tools=dict(torch="x"), cache_key="a" * 64, export=dict(top_k=64))


def _leaves(d, path=()):
    if isinstance(d, dict) and d:
        for k, v in d.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(d, list) and d:
        for i, v in enumerate(d):
            yield from _leaves(v, path + (i,))
    else:
        yield path


def test_every_field_the_builder_writes_is_checked():
    """Each value written (but the recorded options and tool versions) replaced by garbage is
    refused: no field is written that nothing validates."""
    m = built()
    paths = [p for p in _leaves(m) if p[0] not in ("export", "tools")]
    assert len(paths) > 100
    for p in paths:
        bad = copy.deepcopy(m)
        d = bad
        for k in p[:-1]:
            d = d[k]
        d[p[-1]] = [[["garbage"]]]
        with pytest.raises(ManifestError, match=r"^the manifest being written(: field '[^']+' | is not a var-ssg manifest| has format version)"):
            check_manifest(bad)


# fields where another value of the same type and within bounds is some other valid export's
# manifest, with what catches a lie in them; each is still refused out of its bounds or format
OPEN_FIELDS = {
    ("opset",): (16, "an export option in 17..20; the graph carries its own opset"),
    ("weights", "seed"): (-1, "any seed is valid; parity's weights check rebuilds the weights from it"),
    ("external_data", "referenced_bytes"): (-1, "recorded statistics of the export"),
    ("external_data", "parameter_bytes"): (-1, "recorded statistics of the export"),
    ("cache_key",): ("A" * 64, "any sha256; export recomputes the key before reusing artifacts"),
    ("created",): ("yesterday", "any time; an ISO 8601 time"),
}


def listed(m):
    """`m` with its files listed, as write_manifest lists them (the weights file's size is
    external_data.bytes)."""
    files = {f: dict(bytes=10 if f == m["external_data"]["file"] else 100, sha256="b" * 64)
             for f in (m["graphs"]["step"]["file"], m["graphs"]["step"]["consts"], m["graphs"]["decoder"]["file"],
                       m["external_data"]["file"])}
    return dict(m, files=files)


def _same_type_wrong(v, in_shape):
    """Plausible wrong values of the same kind: a neighbouring integer, a string with its last
    character changed, the other bool; a symbolic dimension replaced by a number."""
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v - 1]
    if isinstance(v, float):
        return [v * 2 + 1]
    if in_shape:                                    # a symbolic dimension: a fixed one instead
        return [1]
    return [v[:-1] + ("1" if v[-1:] != "1" else "2")]


def test_every_field_is_checked_for_its_value_not_only_its_type():
    """Each value written (but the recorded options and tool versions), changed to a plausible
    wrong value of the same type (a wrong int, a wrong string, a wrong shape), is refused, the
    files listed as the loader sees them; OPEN_FIELDS are refused out of their bounds instead."""
    from var_ssg.contract.schema import validate
    m = listed(built())
    validate("m", m)
    paths = [p for p in _leaves(m) if p[0] not in ("export", "tools", "files")]
    assert len(paths) > 700
    accepted = []
    for p in paths:
        d = m
        for k in p[:-1]:
            d = d[k]
        d0 = d[p[-1]]
        tries = [OPEN_FIELDS[p][0]] if p in OPEN_FIELDS else _same_type_wrong(d0, "shape" in p)
        refused = False
        for v in tries:
            d[p[-1]] = v                    # changed in place, restored below (validate only reads)
            try:
                validate("m", m)
            except ManifestError:
                refused = True
            finally:
                d[p[-1]] = d0
        if not refused:
            accepted.append((p, d0, tries))
    assert not accepted, accepted


@pytest.mark.parametrize("where", [(), ("dse",), ("sampler",), ("kv",), ("weights",), ("external_data",),
                                   ("graphs",), ("graphs", "step"), ("graphs", "decoder")])
def test_unknown_fields_are_refused(where):
    m = built()
    d = m
    for k in where:
        d = d[k]
    d["surprise"] = 1
    with pytest.raises(ManifestError, match="surprise' is not part of this format"):
        check_manifest(m)


def test_derived_fields_come_from_the_contract():
    m = built(top_k=0)
    assert m["sampler"] == dict(k_max=64, top_k_requested=0)        # V = 64 <= TensorRT's TopK limit: K = V
    assert m["kv"]["dtype"] == "float32" and len(m["graphs"]["step"]["profiles"]) == 10
    bad = copy.deepcopy(m)
    bad["sampler"]["k_max"] = 32
    with pytest.raises(ManifestError, match="'sampler.k_max' is 32, but top-k 0 with V = 64 bakes 64"):
        check_manifest(bad)
