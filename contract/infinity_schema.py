"""The manifest of Infinity artifacts (family "infinity"; DESIGN.md, "Infinity"):
built by `build_infinity_manifest`, checked by `validate_infinity` (which contract.schema.validate
calls for that family), with VAR's header, weights, files and hashes. It refuses keys it does
not know, as VAR's schema does.

    family "infinity", preset + config (the InfinityConfig), batch, precision (fp32), opset,
    dse.transform, sampler.k_max = 2 (TopK over the two values of a bit), ssg (a fixed note),
    text (the T5 encoder the weights expect: eager, on the host; text.onnx takes its states),
    weights, kv, external_data, graphs {text, step, decoder}, [engines {text, step, decoder},
    tensorrt: written by export.trt_build with --target trt; each step profile spans every
    aspect ratio's shapes at its scale], files, tools, cache_key, created, export
"""
from __future__ import annotations

import datetime
from typing import Any, Dict

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import DSE_TRANSFORMS
from var_ssg.graphs.infinity_config import InfinityConfig, get_infinity_preset
from var_ssg.graphs.infinity_io import (KV_LAYOUT, TEXT_KV_LAYOUT, InfinityDecoderIO, InfinityStepIO, InfinityTextIO)
from .dtypes import DTYPE_NAMES
from .schema import (FORMAT, FORMAT_VERSION, MAX_BATCH, MAX_OPSET, MIN_OPSET, SHA256, Check, check_header,
                     validate_files, validate_weights)

FAMILY = "infinity"
TOP_LEVEL = ("format", "format_version", "family", "preset", "config", "batch", "precision", "opset", "dse", "sampler",
             "ssg", "text", "weights", "kv", "external_data", "graphs", "engines", "tensorrt", "files", "tools", "cache_key", "created", "export")
SSG_NOTE = dict(beta="graph input per scale (scales 1..K-1)",
                prior="DSE of the previous scale's CFG bit logits, every one of the V channels alike")
TEXT_NOTE = "prompts -> T5 encoder states (eager, transformers, on the host) -> text.onnx"
GRAPH_KEYS = dict(text=("file", "inputs", "outputs"), step=("file", "inputs", "outputs", "dynamic_inputs"),
                  decoder=("file", "inputs", "outputs", "dynamic_inputs"))


def infinity_config_to_json(cfg: InfinityConfig) -> Dict[str, Any]:
    v = cfg.vae
    return dict(name=cfg.name, depth=cfg.depth, width=cfg.width, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                text_dim=cfg.text_dim, text_maxlen=cfg.text_maxlen, d_vae=cfg.d_vae, V=cfg.V,
                spatial_patchify=cfg.spatial_patchify, pixels=cfg.pixels, t5=cfg.t5,
                vae=dict(bits=v.bits, ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks))


def _ios(cfg: InfinityConfig, batch: int):
    return dict(text=InfinityTextIO(cfg, batch), step=InfinityStepIO(cfg, batch), decoder=InfinityDecoderIO(cfg, batch))


def build_infinity_manifest(cfg: InfinityConfig, *, batch: int, precision: str, opset: int, transform: str,
                            weights: Dict[str, Any], external_data: Dict[str, Any], graphs: Dict[str, Dict[str, Any]],
                            tools: Dict[str, str], cache_key: str, export: Dict[str, Any]) -> Dict[str, Any]:
    """The manifest of an Infinity export (before write_manifest lists the files); validated."""
    io = ("file", "inputs", "outputs")
    g = {name: {k: graphs[name][k] for k in io} for name in ("text", "step", "decoder")}
    g["step"]["dynamic_inputs"] = InfinityStepIO(cfg, batch).dynamic_inputs
    g["decoder"]["dynamic_inputs"] = list(InfinityDecoderIO.dynamic)
    data = dict(format=FORMAT, format_version=FORMAT_VERSION, family=FAMILY, preset=cfg.name,
                config=infinity_config_to_json(cfg), batch=batch, precision=precision, opset=opset,
                dse=dict(transform=transform), sampler=dict(k_max=2), ssg=dict(SSG_NOTE),
                text=dict(encoder=cfg.t5, dim=cfg.text_dim, max_length=cfg.text_maxlen, note=TEXT_NOTE),
                weights=dict(weights), kv=dict(layout=KV_LAYOUT, text_layout=TEXT_KV_LAYOUT, dtype="float32"),
                external_data=dict(external_data), graphs=g, tools=dict(tools), cache_key=cache_key,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), export=dict(export))
    validate_infinity("the manifest being written", data, listed=False)
    return data


def validate_infinity(path: str, data: Any, listed: bool = True) -> InfinityConfig:
    c = Check(path)
    check_header(path, data)
    c.only(data, TOP_LEVEL, "")
    c.choice(data, "family", (FAMILY,), "family")
    preset = c.get(data, "preset", str)
    try:
        cfg = get_infinity_preset(preset)
    except ConfigError as e:
        c.fail("preset", f"is not usable ({e})")
    if c.get(data, "config", dict) != infinity_config_to_json(cfg):
        c.fail("config", f"does not match the preset {preset}")
    B = c.int_in(data, "batch", 1, MAX_BATCH)
    c.choice(data, "precision", ("fp32",))
    c.int_in(data, "opset", MIN_OPSET, MAX_OPSET)
    dse = c.get(data, "dse", dict)
    c.only(dse, ("transform",), "dse")
    c.choice(dse, "transform", DSE_TRANSFORMS, "dse.transform")
    sampler = c.get(data, "sampler", dict)
    c.only(sampler, ("k_max",), "sampler")
    c.int_in(sampler, "k_max", 2, 2, "sampler.k_max")
    if c.get(data, "ssg", dict) != SSG_NOTE:
        c.fail("ssg", "is not this format's note")
    want_text = dict(encoder=cfg.t5, dim=cfg.text_dim, max_length=cfg.text_maxlen, note=TEXT_NOTE)
    if c.get(data, "text", dict) != want_text:
        c.fail("text", f"is not what {preset} takes ({want_text})")
    validate_weights(c, data)
    kv = c.get(data, "kv", dict)
    if kv != dict(layout=KV_LAYOUT, text_layout=TEXT_KV_LAYOUT, dtype="float32"):
        c.fail("kv", f"must be {{layout: {KV_LAYOUT}, text_layout: {TEXT_KV_LAYOUT}, dtype: float32}}")
    ext = c.get(data, "external_data", dict)
    c.only(ext, ("file", "bytes", "referenced_bytes", "parameter_bytes"), "external_data")
    c.file(ext, "file", "external_data.file")
    for key in ("bytes", "referenced_bytes", "parameter_bytes"):
        c.int_in(ext, key, 0, 2 ** 50, f"external_data.{key}")
    c.get(data, "tools", dict)
    if not SHA256.fullmatch(c.get(data, "cache_key", str)):
        c.fail("cache_key", "is not a sha256 hex digest")
    try:
        datetime.datetime.fromisoformat(c.get(data, "created", str))
    except ValueError:
        c.fail("created", "is not an ISO 8601 time")
    c.get(data, "export", dict)
    graphs = c.get(data, "graphs", dict)
    c.only(graphs, tuple(GRAPH_KEYS), "graphs")
    sched = cfg.schedule(1.0)
    step_io = InfinityStepIO(cfg, B)
    fixed = dict(text=InfinityTextIO(cfg, B).shapes(),
                 step={**step_io.profile(sched, sched.num_scales - 1), **step_io.output_shapes(sched, sched.num_scales - 1)},
                 decoder=dict(summed=InfinityDecoderIO(cfg, B).summed_shape(sched),
                              image=InfinityDecoderIO(cfg, B).image_shape(sched)))
    dyn = dict(text={}, step={"summed_out": {1: "F"}, "bits": {1: "n"}, "logits": {1: "n"}, "logits_cfg": {1: "n"},
                              "new_kv": {0: "n"}}, decoder=dict(InfinityDecoderIO.dynamic, image={2: "H", 3: "W"}))
    from var_ssg.graphs.infinity_io import DYNAMIC_AXES
    dyn["step"].update(DYNAMIC_AXES)
    for name, io in _ios(cfg, B).items():
        field = f"graphs.{name}"
        g = c.get(graphs, name, dict, field)
        c.only(g, GRAPH_KEYS[name], field)
        c.file(g, "file", f"{field}.file")
        ins = c.tensors(g, "inputs", f"{field}.inputs")
        outs = c.tensors(g, "outputs", f"{field}.outputs")
        if list(ins) != list(io.inputs) or list(outs) != list(io.outputs):
            c.fail(field, f"has inputs {list(ins)} / outputs {list(outs)}, this runtime needs "
                          f"{list(io.inputs)} / {list(io.outputs)}")
        for n, dt in list(ins.items()) + list(outs.items()):
            if dt != io.dtype(n):
                c.fail(field, f"declares {n} as {dt}, the graph's {n} is {io.dtype(n)}")
        for kind in ("inputs", "outputs"):        # fixed dims as the preset implies; the dynamic ones named
            for i, t in enumerate(g[kind]):
                want, axes = fixed[name][t["name"]], dyn[name].get(t["name"], {})
                f = f"{field}.{kind}[{i}].shape"
                if len(t["shape"]) != len(want):
                    c.fail(f, f"is {t['shape']}, {t['name']} has {len(want)} dimensions")
                for a, (got, w) in enumerate(zip(t["shape"], want)):
                    if a in axes and not isinstance(got, str):
                        c.fail(f, f"is {t['shape']}: dimension {a} of {t['name']} differs between scales (symbolic)")
                    if a not in axes and got != w:
                        c.fail(f, f"is {t['shape']}: dimension {a} of {t['name']} is {w} for {preset} at batch {B}")
        if name != "text" and c.get(g, "dynamic_inputs", list, f"{field}.dynamic_inputs") != \
                (step_io.dynamic_inputs if name == "step" else list(InfinityDecoderIO.dynamic)):
            c.fail(f"{field}.dynamic_inputs", "are not this format's")
    needed = {graphs[n]["file"] for n in GRAPH_KEYS} | {ext["file"]}
    if len(needed) != 4:
        c.fail("graphs", "names one file for two roles (the three graphs and external_data.file are four files)")
    needed |= _validate_engines(c, data, cfg, B)
    if not listed:
        return cfg
    files = validate_files(c, data)
    for rel in sorted(needed - set(files)):
        c.fail("files", f"does not list {rel!r} (every file the runtime opens is listed with its size and sha256)")
    if files[ext["file"]]["bytes"] != ext["bytes"]:
        c.fail("external_data.bytes", f"is {ext['bytes']}, {ext['file']} is listed with {files[ext['file']]['bytes']}")
    return cfg


def _validate_engines(c: Check, data: Dict[str, Any], cfg: InfinityConfig, B: int) -> set:
    """`engines` and `tensorrt` (--target trt): the files, and the profiles export.trt_build
    gives them (graphs.infinity_io spans: every aspect ratio's shapes at each scale)."""
    if not data.get("engines"):
        if data.get("tensorrt"):
            c.fail("tensorrt", "is there without engines")
        return set()
    engines = c.get(data, "engines", dict)
    c.only(engines, tuple(GRAPH_KEYS), "engines")
    K = cfg.schedule(1.0).num_scales
    step = [InfinityStepIO(cfg, B).profile_span(k) for k in range(K)]
    want = dict(text=[], step=step, decoder=[InfinityDecoderIO(cfg, B).summed_span()])
    files = set()
    for name, spans in want.items():
        field = f"engines.{name}"
        e = c.get(engines, name, dict, field)
        files.add(c.file(e, "file", f"{field}.file"))
        if c.get(e, "onnx", str, f"{field}.onnx") != data["graphs"][name]["file"]:
            c.fail(f"{field}.onnx", f"is not graphs.{name}.file")
        for key, i in (("profiles", 1), ("profile_min", 0), ("profile_max", 2)):
            got = e.get(key, []) if key != "profiles" else c.get(e, key, list, f"{field}.{key}")
            if got != [{n: v[i] for n, v in s.items()} for s in spans]:
                c.fail(f"{field}.{key}", f"are not the {'per-scale ' if name == 'step' else ''}shapes of every "
                                         f"aspect ratio's schedule; re-export with --target trt --force")
    t = c.get(data, "tensorrt", dict)
    for key in ("version", "gpu", "compute_capability"):
        c.get(t, key, str, f"tensorrt.{key}")
    for key in ("hardware_compatible", "version_compatible"):
        c.get(t, key, bool, f"tensorrt.{key}")
    if len(files) != 3 or files & {data["graphs"][n]["file"] for n in GRAPH_KEYS}:
        c.fail("engines", "must name three engine files of their own")
    return files
