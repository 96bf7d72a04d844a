"""The eager PyTorch backend for Infinity: the reference (graphs.infinity_step.InfinityScaleStep:
torch.fft DSE, F.interpolate resampling, rope_tables; the per-scale `scale_*` feeds are not
used). Its text encoding is the text graph's module run eagerly."""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.infinity import Infinity
from var_ssg.graphs.infinity_step import InfinityDecoder, InfinityText, build_scale_steps
from var_ssg.graphs.infinity_vae import BSQVAE

from .base import InfinityInfo, to_torch, torch_host

STEP_FEEDS_EAGER = ("cond", "text_kv", "text_mask2", "summed", "noise", "cfg", "tau", "top_k", "top_p", "beta",
                    "past_kv", "prev_logits", "forced", "force")


class InfinityEagerBackend:
    def __init__(self, model: Infinity, vae: BSQVAE, transform: str = "dct", device: str = "cpu",
                 source_note: str = ""):
        if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", str(device)):
            raise ConfigError(f"--device must be cpu or cuda (or cuda:N), got {device!r}")
        if device != "cpu" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device visible to PyTorch (use --device cpu)")
        self.model, self.vae, self.device = model.to(device), vae.to(device), device
        self.transform, self.source_note = transform, source_note
        self.text = InfinityText(self.model)
        self.decoder = InfinityDecoder(self.vae)
        self._steps: Dict[Tuple, list] = {}
        self.info = InfinityInfo(name="eager", cfg=model.cfg, transform=transform, batch=None, device=device)

    @classmethod
    def from_manifest(cls, man, device: str = "cpu"):
        """The reference for a set of artifacts: the same weights (hash-checked) and DSE transform."""
        from var_ssg.graphs.infinity_weights import load_infinity
        w = man.weights
        model, vae, src = load_infinity(man.cfg, w.get("ckpt"), w.get("vae_ckpt"),
                                        w.get("seed") if w["kind"] == "random" else None)
        for key in ("ckpt_sha256", "vae_sha256"):
            if w.get(key) and getattr(src, key) != w[key]:
                raise ConfigError(f"the checkpoint files changed since export ({key} differs): re-export")
        return cls(model, vae, transform=man.transform, device=device, source_note=src.describe())

    @torch.inference_mode()
    def encode(self, feeds):
        cond, text_kv, m2 = self.text(**{n: to_torch(v, self.device) for n, v in feeds.items()})
        return dict(cond=cond, text_kv=text_kv, text_mask2=m2)

    @torch.inference_mode()
    def step(self, sched, k: int, feeds, kv_out: torch.Tensor):
        key = (sched.template, sched.hw)
        if key not in self._steps:
            self._steps[key] = build_scale_steps(self.model, sched, self.transform)
        f = {n: to_torch(feeds[n], self.device) for n in STEP_FEEDS_EAGER}
        bits, logits, logits_cfg, summed, new_kv = self._steps[key][k](**f)
        kv_out.copy_(new_kv)
        return dict(bits=bits, logits=logits, logits_cfg=logits_cfg, summed_out=summed)

    @torch.inference_mode()
    def decode(self, summed):
        return self.decoder(to_torch(summed, self.device))

    def alloc_kv(self, shape) -> torch.Tensor:
        return torch.empty(tuple(shape), device=self.device)

    def host(self, x):
        return torch_host(x)
