"""TensorRT backend for Infinity artifacts exported with `--target trt` (DESIGN.md "Infinity"):
text.plan, step_all.plan and decoder.plan, run with VAR's TensorRT machinery
(runtime.backends.trt: the checks before loading, `TrtRunner`'s static bindings and CUDA graphs,
one USER_MANAGED context per step profile); the text, step and decoder contexts all share one
scratch buffer (they run one after another on one stream). The interface is
InfinityOrtBackend's (encode, step(sched, k, feeds, kv_out), decode, alloc_kv, host).

* Profiles: the step engine has one profile per scale, each spanning that scale's shapes over
  every aspect-ratio template (export.trt_build.plan_infinity), in the manifest's
  `profile_scales` order; scale k of any template runs on the context of scale k's profile, with
  that schedule's input shapes (graphs.infinity_io.InfinityStepIO.profile). The decoder's one
  profile spans every template's final grid.
* Schedules: a context's shapes and addresses are set for one schedule at a time. The first step
  of another schedule (aspect ratio) binds every scale and the decoder again and drops their
  CUDA graphs: each scale then runs plainly once and is captured on its second run of that
  schedule (a graph is never replayed after its context was set up for other shapes).
* The KV cache is owned by the backend: one buffer of the longest template's length, allocated
  once (`alloc_kv` returns its first L rows), so past_kv (the prefix) and new_kv (the slice)
  are bound by address and never copied.
* Text: the text engine's outputs are static device tensors, and `encode` returns them as they
  are (valid until the next encode); the step engine's cond / text_kv / text_mask2 are bound to
  those same tensors, so the text K/V (the largest input) is never copied per scale.
* The per-scale `scale_*` constants are copied into their static tensors when the array the
  pipeline feeds changes (runtime.infinity caches them per schedule: once per schedule); every
  other input is copied per step into its static tensor; outputs are cloned.

Tested on the CPU against the real TensorRT 10.8, 10.16 and 11.4 Python bindings through the
strict fake of tests/trt_real (execution by ONNX Runtime); never yet run on a GPU with TensorRT.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from var_ssg.common.errors import ConfigError
from var_ssg.contract.dtypes import torch_dtype
from var_ssg.contract.manifest import Manifest
from var_ssg.contract.tensorrt import check_profile_scales
from var_ssg.graphs.infinity_io import InfinityDecoderIO, InfinityStepIO, template_schedules

from .base import InfinityInfo, to_torch, torch_host
from .trt import TrtRunner, _Engine, check_ranged_engine_io, deserialize, open_tensorrt

TEXT, DECODER = -2, -1              # TrtRunner keys; scales are 0..K-1
TEXT_OUT = ("cond", "text_kv", "text_mask2")
STEP_OUT = ("bits", "logits", "logits_cfg", "summed_out")


class InfinityTrtBackend(TrtRunner):
    def __init__(self, man: Manifest, device: str = "cuda", cuda_graphs: bool = True):
        trt, sec, rt = open_tensorrt(man, device)
        super().__init__(cuda_graphs)
        engines = man.engines
        self.man, self.trt, self.cfg, self.B = man, trt, man.cfg, man.batch
        self.K = self.cfg.schedule(1.0).num_scales
        order = check_profile_scales(engines["step"].get("profile_scales"), self.K)    # engine profile -> scale
        loaded, profiles = {}, dict(text=0, step=self.K, decoder=0)
        for name in profiles:
            path = man.path(engines[name]["file"])
            e = deserialize(rt, path, sec)
            check_ranged_engine_io(e, path, man.graph(name), engines[name])
            loaded[name] = (e, path)
        # the three engines run one after another on one stream: one scratch buffer for all
        size = max(_Engine.scratch_size(e, profiles[name]) for name, (e, _) in loaded.items())
        self.scratch = torch.empty(size, dtype=torch.uint8, device="cuda")
        eng = {name: _Engine(trt, e, path, profiles[name], self.stream, scratch=self.scratch)
               for name, (e, path) in loaded.items()}
        self.text_engine, self.step_engine, self.dec_engine = eng["text"], eng["step"], eng["decoder"]
        self.step_contexts = {k: eng["step"].contexts[i] for i, k in enumerate(order)}    # scale -> its context
        self.dtypes = {g: {n: torch_dtype(dt) for n, dt in man.input_dtypes(g).items()} for g in ("text", "step")}
        self.out_dtypes = {g: {o["name"]: torch_dtype(o["dtype"]) for o in man.graph(g)["outputs"]}
                           for g in ("text", "step", "decoder")}
        self.dynamic = set(man.graph("step")["dynamic_inputs"])
        self.step_io, self.dec_io = InfinityStepIO(self.cfg, self.B), InfinityDecoderIO(self.cfg, self.B)
        self.kv: Optional[torch.Tensor] = None          # (longest L, depth, 2, 2B, heads, head_dim)
        self.kv_dtype = torch_dtype(man.data["kv"]["dtype"])
        self.sched, self._sched = None, None            # the schedule the step contexts are set up for
        self.fed: Dict[tuple, object] = {}              # (scale, scale_* name) -> the array last copied
        self.info = InfinityInfo(name="tensorrt", cfg=self.cfg, transform=man.transform, batch=self.B, device="cuda")
        self.source_note = man.source_note

    # ---- the text engine (static shapes: prompts padded to the preset's text length)
    def _text_tensors(self) -> Dict[str, torch.Tensor]:
        if TEXT not in self.bound:
            g = self.man.graph("text")
            t = {i["name"]: torch.empty(i["shape"], dtype=self.dtypes["text"][i["name"]], device="cuda")
                 for i in g["inputs"]}
            t.update({o["name"]: torch.empty(o["shape"], dtype=self.out_dtypes["text"][o["name"]], device="cuda")
                      for o in g["outputs"]})
            self._bind_static(TEXT, self.text_engine.contexts[0], t, {})
        return self.bound[TEXT]

    def encode(self, feeds: Dict[str, object]) -> Dict[str, torch.Tensor]:
        """The text engine's outputs: its own static tensors (the step engine reads them in place),
        valid until the next encode."""
        t = self._text_tensors()
        self._copy_in(t, {n: feeds[n] for n in self.dtypes["text"]})
        self._execute(TEXT, self.text_engine.contexts[0])
        torch.cuda.current_stream().wait_stream(self.stream)
        return {n: t[n] for n in TEXT_OUT}

    def _copy_in(self, t: Dict[str, torch.Tensor], feeds: Dict[str, object]) -> None:
        """Feeds (numpy or tensors) into their static tensors, on the backend's stream."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for name, src in feeds.items():
                src = to_torch(np.ascontiguousarray(src), "cpu") if isinstance(src, np.ndarray) else src
                if t[name].data_ptr() != src.data_ptr():
                    t[name].copy_(src.reshape(t[name].shape), non_blocking=True)

    # ---- the KV cache: one buffer for every schedule, so bound addresses stay valid
    def alloc_kv(self, shape) -> torch.Tensor:
        L, rest = int(shape[0]), tuple(int(x) for x in shape[1:])
        if self.kv is None:
            longest = max(s.L for s in template_schedules(self.cfg))
            self.kv = torch.empty((longest,) + rest, dtype=self.kv_dtype, device="cuda")
        if tuple(self.kv.shape[1:]) != rest or L > self.kv.shape[0]:
            raise ConfigError(f"a KV cache of shape {list(shape)} was asked for; these artifacts' engines take "
                              f"at most {list(self.kv.shape)} (batch {self.B}): run them through "
                              f"runtime.infinity.InfinityPipeline")
        return self.kv[:L]

    # ---- the step engine
    def _use_schedule(self, sched) -> None:
        key = (sched.template, tuple(sched.hw))
        if self.sched == key:
            return
        if sched.num_scales != self.K:
            raise ConfigError(f"the schedule of template {sched.template} has {sched.num_scales} scales; the engines "
                              f"of {self.cfg.name} have {self.K} step profiles")
        self._forget(list(range(self.K)) + [DECODER])       # other shapes: bind again, capture again
        self.fed.clear()
        self.sched, self._sched = key, sched

    def _bind_step(self, k: int, kv_out: torch.Tensor, text: Dict[str, torch.Tensor]):
        sched = self._sched
        prof = self.step_io.profile(sched, k)
        Lp = prof["past_kv"][0]
        tensors = {}
        for name, shape in prof.items():
            if name in TEXT_OUT:
                tensors[name] = text[name]                      # the text engine's outputs, in place
            elif name == "past_kv":
                tensors[name] = self.kv[:Lp]                    # the cache prefix
            else:
                tensors[name] = torch.empty(shape, dtype=self.dtypes["step"][name], device="cuda")
        for name, shape in self.step_io.output_shapes(sched, k).items():
            tensors[name] = kv_out if name == "new_kv" else torch.empty(shape, dtype=self.out_dtypes["step"][name],
                                                                        device="cuda")
        self._bind_static(k, self.step_contexts[k], tensors, {n: s for n, s in prof.items() if n in self.dynamic})
        for name in [key for key in self.fed if key[0] == k]:     # new static tensors: constants not there yet
            del self.fed[name]

    def step(self, sched, k: int, feeds: Dict[str, object], kv_out: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.kv is None or not isinstance(kv_out, torch.Tensor) or \
                kv_out.untyped_storage().data_ptr() != self.kv.untyped_storage().data_ptr():
            raise ConfigError("the tensorrt backend owns the KV cache (alloc_kv): run it through "
                              "runtime.infinity.InfinityPipeline")
        self._use_schedule(sched)
        text = self._text_tensors()
        if k not in self.bound:
            self._bind_step(k, kv_out, text)
        t = self.bound[k]
        for name in ("past_kv", "new_kv"):
            given = kv_out if name == "new_kv" else feeds[name]
            if given.data_ptr() != t[name].data_ptr() or tuple(given.shape) != tuple(t[name].shape):
                raise ConfigError(f"{name} of scale {k} is not the slice of the backend's KV cache that scale {k} "
                                  f"of this schedule reads: run it through runtime.infinity.InfinityPipeline")
        copy = {}
        for name in self.dtypes["step"]:
            if name in ("past_kv",):
                continue
            if name.startswith("scale_"):
                if self.fed.get((k, name)) is feeds[name]:
                    continue                                    # this schedule's constant, already there
                self.fed[(k, name)] = feeds[name]
            copy[name] = feeds[name]
        self._copy_in(t, copy)
        self._execute(k, self.step_contexts[k])
        torch.cuda.current_stream().wait_stream(self.stream)
        return {n: t[n].clone() for n in STEP_OUT}

    # ---- the decoder (one profile over every template's final grid)
    def decode(self, summed) -> torch.Tensor:
        shape = list(summed.shape)
        t = self.bound.get(DECODER)
        if t is None or list(t["summed"].shape) != shape:
            scheds = [s for s in template_schedules(self.cfg) if self.dec_io.summed_shape(s) == shape]
            if not scheds:
                raise ConfigError(f"summed codes of shape {shape} are no template's final grid for {self.cfg.name} "
                                  f"at batch {self.B}")
            self._forget([DECODER])
            t = dict(summed=torch.empty(shape, dtype=torch.float32, device="cuda"),
                     image=torch.empty(self.dec_io.image_shape(scheds[0]), dtype=self.out_dtypes["decoder"]["image"],
                                       device="cuda"))
            self._bind_static(DECODER, self.dec_engine.contexts[0], t, dict(summed=shape))
        self._copy_in(t, dict(summed=summed))
        self._execute(DECODER, self.dec_engine.contexts[0])
        torch.cuda.current_stream().wait_stream(self.stream)
        return t["image"].clone()

    def host(self, x) -> np.ndarray:
        return torch_host(x)
