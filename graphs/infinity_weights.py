"""Infinity + BSQ VAE weights: strict loading of official-format state dicts, and seeded random
weights in the same format (DESIGN.md, "Infinity" and "Random weights").

Strict: every parameter of the official modules must be in the file with its shape, and no
other key. Two kinds of names are the loader's own business, as in the official loader:
* derived buffers (`*.zero_k_bias` = 0, the BSQ `lfq.mask` = 2^(d-1)..2^0): filled here; a file
  that has them must hold exactly those values;
* stale buffers of older checkpoints that the official `load_state_dict` drops
  (`lvl_1L`, `attn_bias_for_masking`, `Infinity_visible_kvlen`, `Infinity_invisible_qlen`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from var_ssg.common.errors import ConfigError

from .config import check_seed
from .infinity import Infinity
from .infinity_config import InfinityConfig
from .infinity_vae import BSQVAE
from .weights import (CheckpointError, WeightSource, _load_into, _random_fill, check_state_dict, random_seed_of,
                      read_state_dict)

STALE_KEYS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


def meta_models(cfg: InfinityConfig) -> Tuple[Infinity, BSQVAE]:
    with torch.device("meta"):
        return Infinity(cfg), BSQVAE(cfg.vae)


def derived_buffers(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The buffers whose values follow from the config (computed on the CPU)."""
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("zero_k_bias"):
            out[k] = torch.zeros(v.shape)
        elif k.endswith("lfq.mask"):
            out[k] = 2 ** torch.arange(v.shape[0] - 1, -1, -1)
    return out


def _complete(module: torch.nn.Module, sd: Dict[str, torch.Tensor], path: str, what: str) -> Dict[str, torch.Tensor]:
    """Drop stale names, check or fill the derived buffers."""
    sd = {k: v for k, v in sd.items() if k not in STALE_KEYS}
    for k, want in derived_buffers(module).items():
        if k in sd:
            if tuple(sd[k].shape) != tuple(want.shape) or not torch.equal(sd[k].to(want.dtype), want):
                raise CheckpointError(f"{what} checkpoint {path}: key {k!r} does not hold the values the config "
                                      f"implies (shape {tuple(want.shape)}); wrong preset?")
        sd[k] = want
    return sd


def _read_vae(path: str) -> Dict[str, torch.Tensor]:
    """The official VAE file is {'vae': state_dict, ...}; a plain state dict is accepted too."""
    try:
        return read_state_dict(path)
    except CheckpointError as e:
        if "not a state dict of tensors" not in str(e):
            raise
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    sd = obj.get("vae") if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"BSQ VAE checkpoint {path}: neither a state dict of tensors nor {{'vae': state dict}}")
    return sd


def load_state_dicts(cfg: InfinityConfig, sd: Dict[str, torch.Tensor], vae_sd: Dict[str, torch.Tensor],
                     path: str = "<state dict>", vae_path: str = "<state dict>") -> Tuple[Infinity, BSQVAE]:
    """Strict: keys and shapes checked (the first bad key is named), values finite, assigned."""
    model, vae = meta_models(cfg)
    parts = [(model, _complete(model, sd, path, "Infinity"), path, "Infinity"),
             (vae, _complete(vae, vae_sd, vae_path, "BSQ VAE"), vae_path, "BSQ VAE")]
    for module, d, p, what in parts:
        check_state_dict(module, d, p, what, cfg.name)
    for module, d, p, what in parts:
        _load_into(module, d, p, what)
    return model.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def load_infinity(cfg: InfinityConfig, ckpt: Optional[str] = None, vae_ckpt: Optional[str] = None,
                  random_init: Optional[int] = None) -> Tuple[Infinity, BSQVAE, WeightSource]:
    """(model, vae, source) in eval mode, fp32, on the CPU: from files or seeded random weights."""
    if random_init is not None:
        seed = random_seed_of(random_init, ckpt, vae_ckpt)
        model, vae = random_infinity(cfg, seed)
        return model, vae, WeightSource(kind="random", seed=seed)
    if not ckpt or not vae_ckpt:
        raise ConfigError("Infinity needs --ckpt and --vae-ckpt (the official files, e.g. infinity_2b_reg.pth and "
                          "infinity_vae_d32_reg.pth), or --random-init SEED")
    model, vae = load_state_dicts(cfg, read_state_dict(ckpt), _read_vae(vae_ckpt), ckpt, vae_ckpt)
    return model, vae, WeightSource(kind="checkpoint", ckpt=str(ckpt), vae_ckpt=str(vae_ckpt))


# --------------------------------------------------------------------------- random weights
def _role(model: str, name: str, shape, cfg: InfinityConfig) -> Tuple[float, float]:
    """(mean, std) of one parameter: biases and norm weights non-zero, head scaled so that bit
    logits have std ~2, the rest VAR's sqrt(1/3·fan_in)."""
    if model == "vae":
        if name.endswith("norm.weight"):
            return 1.0, 0.1
        if name.endswith("bias"):
            return 0.0, 0.02
        return 0.0, math.sqrt(1.0 / math.prod(shape[1:]))
    if name == "cfg_uncond":
        return 0.0, 1.2 / math.sqrt(cfg.text_dim)
    if name == "head.weight":
        return 0.0, 2.0 / math.sqrt(cfg.width)
    if name.endswith("scale_mul_1H11"):
        return math.log(4.0), 0.2          # per-head scales differ, so a head mix-up shows
    if name.endswith("ada_gss"):
        return 0.0, 1.0 / math.sqrt(cfg.width)
    if name.endswith("bias"):
        return 0.0, 0.02
    if "norm" in name and name.endswith("weight"):
        return 1.0, 0.1
    return 0.0, math.sqrt(1.0 / 3.0 / shape[-1])


def random_state_dicts(cfg: InfinityConfig, seed: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Seeded random weights with the official names (DESIGN.md, "Random weights": one PCG64
    stream per (seed, model, name, chunk)); derived buffers as the loader computes them."""
    seed = check_seed(int(seed), "seed")
    model, vae = meta_models(cfg)
    jobs = []
    for tag, module in (("infinity", model), ("bsqvae", vae)):
        derived = derived_buffers(module)
        for k, v in module.state_dict().items():
            if k not in derived:
                jobs.append((tag, f"{tag}.{k}", tuple(v.shape)) + _role("vae" if tag == "bsqvae" else "t", k, v.shape, cfg))
    filled = _random_fill(jobs, seed)
    out = []
    for tag, module in (("infinity", model), ("bsqvae", vae)):
        derived = derived_buffers(module)
        out.append({k: derived[k] if k in derived else filled[f"{tag}.{k}"] for k in module.state_dict()})
    return out[0], out[1]


def random_infinity(cfg: InfinityConfig, seed: int) -> Tuple[Infinity, BSQVAE]:
    sd, vae_sd = random_state_dicts(cfg, seed)
    return load_state_dicts(cfg, sd, vae_sd, f"random seed {seed}", f"random seed {seed}")
