"""The manifest schema, once (contract.manifest): what build_manifest writes is exactly what the
validator checks. Built from the components alone: no export needed."""
import copy

import pytest

from contract.dtypes import dtype_name_of
from contract.manifest import ManifestError, build_manifest, check_manifest
from graphs.components import DecoderComponent, StepComponent
from graphs.config import get_preset, topk_bake
from graphs.step import StepSpec
from tests.conftest import TINY


def _io(names, feeds, shapes, dtypes=None):
    return [dict(name=n, shape=list(shapes[n]), dtype=(dtypes or {}).get(n) or dtype_name_of(feeds[n].dtype)) for n in names]


def built(**kw):
    cfg = get_preset(TINY)
    args = dict(batch=1, precision="fp32", opset=18, transform="dct", top_k=64)
    args.update(kw)
    step = StepComponent(cfg, args["batch"], StepSpec(transform=args["transform"], k_max=topk_bake(args["top_k"], cfg.V)))
    dec = DecoderComponent(cfg, args["batch"])
    k = step.example_scale()
    feeds = step.example_feeds(k)
    out_dtypes = dict(tokens="int64", new_kv="float32")
    return build_manifest(
        cfg, **args, weights=dict(kind="random", seed=0),
        external_data=dict(file="weights.bin", bytes=10, referenced_bytes=10, parameter_bytes=10),
        step=dict(file=step.file, inputs=_io(step.inputs, feeds, step.profile(k)),
                  outputs=_io(step.outputs, {}, step.output_shapes(k), {n: out_dtypes.get(n, "float32") for n in step.outputs})),
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
        with pytest.raises(ManifestError):
            check_manifest(bad)


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
