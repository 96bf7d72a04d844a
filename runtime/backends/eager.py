"""The eager PyTorch backend: the reference. The only runtime code that touches nn.Modules."""
from __future__ import annotations

from typing import Dict, Optional

import copy
import re

import torch

from var_ssg.contract.dtypes import dtype_name_of
from var_ssg.graphs.config import DEFAULT_TOP_K, VARConfig
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.step import StepSpec, build_steps
from var_ssg.graphs.var import VAR
from var_ssg.graphs.vqvae import VQVAE

from .base import BackendInfo, to_torch, torch_host


class EagerBackend:
    def __init__(self, var: VAR, vae: VQVAE, transform: str = "dct", k_max: int = DEFAULT_TOP_K,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", source_note: str = "",
                 autocast: Optional[torch.dtype] = None, decoder_autocast: Optional[torch.dtype] = None):
        """`dtype`: the transformer's weights and KV cache; `autocast` (with fp32 weights): run each
        step's transformer under torch.autocast in that dtype, as the official code is run in bf16
        (graphs.step.StepSpec.transformer; DESIGN.md "Low precision"); `decoder_autocast`: the
        VQVAE decoder under torch.autocast in that dtype (fp32 weights, the image returned in fp32)."""
        cfg: VARConfig = var.cfg
        if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", str(device)):
            raise ConfigError(f"--device must be cpu or cuda (or cuda:N), got {device!r}")
        if device != "cpu" and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device visible to PyTorch (use --device cpu)")
        if dtype != torch.float32:
            var = copy.deepcopy(var).to(dtype)
        var, vae = var.to(device), vae.to(device)
        if autocast is not None and (dtype != torch.float32 or autocast not in (torch.bfloat16, torch.float16)):
            raise ConfigError("autocast runs fp32 weights in bf16 or fp16 (dtype float32, autocast bfloat16/float16)")
        if decoder_autocast not in (None, torch.bfloat16, torch.float16):
            raise ConfigError("decoder_autocast runs the decoder in bfloat16 or float16")
        self.decoder_autocast = decoder_autocast
        self.device, self.source_note = device, source_note
        self.var, self.vae = var, vae
        self.spec = StepSpec(transform=transform, k_max=k_max, dtype=dtype, autocast=autocast)
        self.steps = [s.to(device) for s in build_steps(var, vae, self.spec)]
        self.info = BackendInfo(name="eager", cfg=cfg, k_max=k_max, transform=transform,
                                kv_dtype=dtype_name_of(dtype), batch=None, device=device)

    @classmethod
    def from_manifest(cls, man, device: str = "cpu", dtype: torch.dtype = torch.float32):
        """The reference for a set of artifacts: same weights (hash-checked), same baked
        sampler K and DSE transform, computed the eager way (torch.fft, F.interpolate)."""
        from var_ssg.graphs.weights import load_models
        var, vae, src = load_models(man.cfg, man.weights.get("ckpt"), man.weights.get("vae_ckpt"),
                                    man.weights.get("seed") if man.weights["kind"] == "random" else None)
        for key in ("ckpt_sha256", "vae_sha256"):
            if man.weights.get(key) and getattr(src, key) != man.weights[key]:
                raise ConfigError(f"the checkpoint files changed since export ({key} differs): re-export")
        return cls(var, vae, transform=man.transform, k_max=man.k_max, dtype=dtype, device=device,
                   source_note=src.describe())

    def alloc_kv(self, shape, dtype: str) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=self.device)

    @torch.inference_mode()
    def step(self, k: int, feeds: Dict[str, object], kv_out: torch.Tensor) -> Dict[str, torch.Tensor]:
        feeds = {n: to_torch(t, self.device) for n, t in feeds.items()}
        tokens, logits, logits_cfg, f_hat, new_kv = self.steps[k](**feeds)
        kv_out.copy_(new_kv)                      # the one copy into the preallocated cache
        return dict(tokens=tokens, logits=logits, logits_cfg=logits_cfg, f_hat_out=f_hat)

    @torch.inference_mode()
    def decode(self, f_hat) -> torch.Tensor:
        f_hat = to_torch(f_hat, self.device)
        if self.decoder_autocast is None:
            return self.vae.fhat_to_img(f_hat)
        with torch.autocast(torch.device(self.device).type, dtype=self.decoder_autocast):
            return self.vae.fhat_to_img(f_hat).float()

    @classmethod
    def run_precision(cls, precision: str) -> dict:
        """EagerBackend's keywords for a graphs.config.RUN_PRECISIONS name: fp32 (the reference);
        bf16 / fp16 (the transformer's weights and KV cache cast, the decoder under autocast);
        bf16-autocast (fp32 weights, the transformer and the decoder under torch.autocast, as the
        official code is run)."""
        from var_ssg.graphs.config import RUN_PRECISIONS
        if precision not in RUN_PRECISIONS:
            raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(RUN_PRECISIONS)}")
        low = torch.float16 if precision == "fp16" else torch.bfloat16
        return {"fp32": {}, "bf16-autocast": dict(autocast=low, decoder_autocast=low)}.get(
            precision, dict(dtype=low, decoder_autocast=low))

    def host(self, x):
        return torch_host(x)

    def zeros(self, shape):
        return torch.zeros(tuple(shape), device=self.device)
