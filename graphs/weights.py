"""Building VAR + VQVAE with weights: official checkpoints (strict), safetensors, the Hugging
Face cache, or seeded random weights.

Models are built on the meta device and materialised by `load_state_dict(assign=True)` from a
memory-mapped `torch.load(weights_only=True)`, so a 4 GB checkpoint costs no extra copy.
"""
from __future__ import annotations

import logging
import math
import pickle
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from var_ssg.common.files import open_regular, sha256_file
from .source import WeightSource  # noqa: F401  (graphs.weights.WeightSource)
from .config import OFFICIAL_CKPTS, OFFICIAL_VAE_CKPT, PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, check_seed, get_preset
from var_ssg.common.errors import ConfigError
from .var import VAR, block_causal_buffers
from .vqvae import VQVAE

log = logging.getLogger(__name__)
HF_REPO = "FoundationVision/var"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (unreadable, wrong keys or shapes, wrong preset)."""


# --------------------------------------------------------------------------- reading files
def _is_safetensors(path: str) -> bool:
    """By content, not by name: safetensors starts with an 8-byte little-endian header length and
    a JSON header; PyTorch files are a zip archive or a pickle."""
    with open_regular(path) as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (100 << 20)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {path}: no such file (check the path, or use --random-init SEED)")
    if not p.is_file():         # a folder, FIFO or device: never opened (a FIFO would block, /dev/zero never ends)
        raise CheckpointError(f"checkpoint {path}: not a regular file")
    try:
        if _is_safetensors(str(p)):
            from safetensors.torch import load_file
            sd = load_file(str(p))
        else:
            try:
                sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:       # old (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, i.e. running the file's code: never do that
        raise CheckpointError(f"checkpoint {path}: holds pickled objects other than tensors (possibly code); refusing "
                              f"to load it. Only plain state dicts of tensors are read: save model.state_dict() "
                              f"or use safetensors") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is the same user-facing problem
        first = (str(e).strip().splitlines() or [""])[0][:200]      # some readers raise with no message
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(e).__name__}{': ' + first if first else ''}); "
                              f"the file is empty, truncated, corrupt or not a PyTorch/safetensors state dict") from None
    if isinstance(sd, dict):
        for wrap in ("state_dict", "model"):
            if wrap in sd and isinstance(sd[wrap], dict):
                sd = sd[wrap]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path}: not a state dict of tensors")
    for k in sd:
        if not isinstance(k, str):
            raise CheckpointError(f"checkpoint {path}: not a state dict of tensors (key {k!r:.60} is a "
                                  f"{type(k).__name__}, not a parameter name)")
    return sd


def _guess_var_depth(sd: Dict[str, torch.Tensor]) -> Optional[int]:
    """The depth the blocks spell: 0..N-1 all present (a stray `blocks.999.` is no depth)."""
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d{1,6})\.", k)] if m}
    return len(blocks) if blocks and blocks == set(range(len(blocks))) else None


def _preset_exists(name: str) -> bool:
    try:
        get_preset(name)
    except ConfigError:
        return False
    return True


_PX = {sum(p * p for p in PATCH_NUMS_256): 256, sum(p * p for p in PATCH_NUMS_512): 512}   # L -> image size


def _layout(L: Optional[int], shared: bool) -> str:
    px = f"{_PX[L]}px " if L in _PX else ""
    aln = "shared AdaLN (shared_ada_lin, blocks.N.ada_gss)" if shared else "per-block AdaLN (blocks.N.ada_lin)"
    return f"{px}(pos_1LC for {L} tokens) with {aln}"


def _preset_for(depth: int, L: Optional[int], shared: bool) -> Optional[str]:
    if _PX.get(L) == 256 and not shared:
        return f"var-d{depth}"
    if _PX.get(L) == 512 and shared:
        return "var-d36" if depth == 36 else f"var-d{depth}-512"
    return None


def _var_hint(module: torch.nn.Module, sd: Dict[str, torch.Tensor], preset: str) -> str:
    """Why a VAR file does not fit the preset: another depth, or another family (token count =
    resolution, AdaLN form). Empty when it looks like the preset: the key message says enough."""
    cfg = module.cfg
    depth = _guess_var_depth(sd)
    if depth is None:
        return ""
    pos = sd.get("pos_1LC")
    L = pos.shape[1] if pos is not None and pos.dim() == 3 else None
    shared = "shared_ada_lin.1.weight" in sd or any(k.endswith(".ada_gss") for k in sd)
    name = preset or cfg.name or f"var-d{cfg.depth}"
    if (L, shared) == (cfg.L, cfg.shared_aln):
        if depth == cfg.depth:
            return ""
        fit = f"var-d{depth}"
        return f"; the file looks like {fit} but the preset is {name}" + (f" (pass --model {fit})" if _preset_exists(fit) else "")
    fit = _preset_for(depth, L, shared)
    fit = fit if fit and _preset_exists(fit) else None
    return (f"; the file looks like var-d{depth} for {_layout(L, shared)}, but the preset {name} is for "
            f"{_layout(cfg.L, cfg.shared_aln)}" + (f" (pass --model {fit})" if fit else ""))


def check_state_dict(module: torch.nn.Module, sd: Dict[str, torch.Tensor], path: str, what: str,
                     preset: str = "") -> None:
    """Strict key/shape check with a message that names the file, the first bad key and, for VAR,
    the preset the file looks like."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    hint = _var_hint(module, sd, preset) if what == "VAR" else ""
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing:
        raise CheckpointError(f"{what} checkpoint {path}: missing key {missing[0]!r} ({len(missing)} missing){hint}")
    if unexpected:
        raise CheckpointError(f"{what} checkpoint {path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected){hint}")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{what} checkpoint {path}: key {k!r} has shape {tuple(sd[k].shape)}, "
                                  f"expected {shape}{hint or ' (wrong preset or VQVAE size?)'}")
        if not sd[k].is_floating_point() and sd[k].dtype != torch.int64:
            raise CheckpointError(f"{what} checkpoint {path}: key {k!r} has dtype {sd[k].dtype}")


# --------------------------------------------------------------------------- building
def _meta_models(cfg: VARConfig) -> Tuple[VAR, VQVAE]:
    with torch.device("meta"):
        return VAR(cfg), VQVAE(cfg.vae)


def _load_into(module, sd, path, what):
    """Values checked, then assigned (keys and shapes were checked by check_state_dict)."""
    params = {n for n, _ in module.named_parameters()}
    for k, v in sd.items():     # NaN/inf weights give one token everywhere or a black image
        if not v.is_floating_point():
            continue
        # buffers may hold -inf (the block-causal attention mask), never NaN
        if not bool(torch.isfinite(v).all() if k in params else not torch.isnan(v).any()):
            raise CheckpointError(f"{what} checkpoint {path}: key {k!r} holds NaN or infinite values; "
                                  f"the file is damaged or not a trained model")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)


def official_files(cfg: VARConfig) -> Tuple[str, str]:
    key = (cfg.depth, cfg.vae.image_size)
    if key not in OFFICIAL_CKPTS or cfg.V != 4096 or cfg.shared_aln != (key == (36, 512)):
        raise CheckpointError(f"no published checkpoint for {cfg.name}: pass --ckpt and --vae-ckpt, or --random-init SEED")
    return OFFICIAL_CKPTS[key], OFFICIAL_VAE_CKPT


def download_official(cfg: VARConfig) -> Tuple[str, str]:
    """Fetch the official files into the Hugging Face cache (no test needs this)."""
    var_file, vae_file = official_files(cfg)
    try:
        from huggingface_hub import hf_hub_download
        return (hf_hub_download(repo_id=HF_REPO, filename=var_file),
                hf_hub_download(repo_id=HF_REPO, filename=vae_file))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(
            f"could not fetch {var_file} and {vae_file} from Hugging Face ({HF_REPO}): {type(e).__name__}. "
            f"Without network, pass local files with --ckpt {var_file} --vae-ckpt {vae_file}, "
            f"or use --random-init SEED for seeded random weights") from None


def random_seed_of(random_init, ckpt, vae_ckpt) -> int:
    """--random-init's seed, checked, and never together with checkpoint files."""
    check_seed(random_init, "--random-init")
    if ckpt is not None or vae_ckpt is not None:
        raise ConfigError("use either --ckpt/--vae-ckpt or --random-init, not both")
    return int(random_init)


def load_models(cfg: VARConfig, ckpt: Optional[str] = None, vae_ckpt: Optional[str] = None,
                random_init: Optional[int] = None, hash_files: bool = True) -> Tuple[VAR, VQVAE, WeightSource]:
    """Return (var, vae, source) in eval mode, fp32, on the CPU."""
    if random_init is not None:
        seed = random_seed_of(random_init, ckpt, vae_ckpt)
        var, vae = random_models(cfg, seed)
        return var, vae, WeightSource(kind="random", seed=seed)
    for flag, path in (("--ckpt", ckpt), ("--vae-ckpt", vae_ckpt)):
        if path is not None and not str(path).strip():      # never "absent": that would download
            raise ConfigError(f"{flag} is empty: give a checkpoint file (or leave out both flags for the official files)")
    if (ckpt is None) != (vae_ckpt is None):
        raise ConfigError("--ckpt and --vae-ckpt go together (VAR weights and VQVAE weights)")
    if ckpt is None:
        ckpt, vae_ckpt = download_official(cfg)
    var, vae = _meta_models(cfg)
    files = [(var, read_state_dict(ckpt), ckpt, "VAR"), (vae, read_state_dict(vae_ckpt), vae_ckpt, "VQVAE")]
    for module, sd, path, what in files:            # a wrong file is refused before any hashing
        check_state_dict(module, sd, path, what, cfg.name)
    # the files are hashed on a second thread while their values are checked and assigned
    # (hashlib and torch both drop the GIL): about half of this stage on 2 cores
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="ckpt-sha256") as pool:
        digests = pool.submit(lambda: [sha256_file(p, stop=stop) for p in (ckpt, vae_ckpt)] if hash_files
                              else [None, None])
        try:
            for module, sd, path, what in files:
                _load_into(module, sd, path, what)
            ckpt_sha256, vae_sha256 = digests.result()
        except BaseException:
            stop.set()                              # an error or Ctrl-C is not kept waiting for the hash
            raise
    src = WeightSource(kind="checkpoint", ckpt=str(ckpt), vae_ckpt=str(vae_ckpt),
                       ckpt_sha256=ckpt_sha256, vae_sha256=vae_sha256)
    return var.eval().requires_grad_(False), vae.eval().requires_grad_(False), src


# --------------------------------------------------------------------------- random weights
# Seeded random weights (DESIGN.md "Random weights"): every value is a uniform draw with the
# std the role needs, from a PCG64 stream keyed by (seed, model, parameter name, chunk), so
# the result does not depend on the thread count or the order of filling, and chunks are
# filled on all cores (numpy releases the GIL while it fills).
_CHUNK = 1 << 22                     # elements per independently seeded stream
_SQRT3 = math.sqrt(3.0)


def _role_std(model: str, name: str, shape, C: int) -> Tuple[float, float]:
    """(mean, std) of one parameter. Biases and norm parameters are non-zero, as in trained
    weights, so a graph that drops one differs from the reference."""
    if model == "vae":
        if name == "quantize.embedding.weight":
            return 0.0, 0.5
        if "norm" in name and name.endswith("weight"):
            return 1.0, 0.1
        if name.endswith("bias"):
            return 0.0, 0.02
        return 0.0, math.sqrt(1.0 / math.prod(shape[1:]))     # conv weights: fan-in scaled
    if name == "head.weight":
        return 0.0, 2.0 / math.sqrt(C)          # logits with std ~2: top-k/top-p meaningful
    if name.endswith("bias") or name in ("q_bias", "v_bias"):
        return 0.0, 0.02
    if "norm" in name and name.endswith("weight"):
        return 1.0, 0.1
    return 0.0, math.sqrt(1 / C / 3)             # VAR's init scale


def _fill_chunk(t: torch.Tensor, key: Tuple[int, ...], i: int, mean: float, std: float) -> None:
    import numpy as np
    a = t.view(-1)[i * _CHUNK:(i + 1) * _CHUNK].numpy()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key + (i,))))
    rng.random(out=a, dtype=np.float32)                      # [0, 1)
    a -= np.float32(0.5)                                     # -> uniform with mean 0, std 1/sqrt(12)
    a *= np.float32(2 * _SQRT3 * std)
    if mean:
        a += np.float32(mean)


def _random_fill(jobs, seed: int, threads: int = 0) -> Dict[str, torch.Tensor]:
    """jobs: (model, name, shape, mean, std) -> {name: tensor}, filled in parallel."""
    import zlib
    out, work = {}, []
    for model, name, shape, mean, std in jobs:
        t = torch.empty(shape, dtype=torch.float32)
        out[name] = t
        key = (seed, zlib.crc32(model.encode()), zlib.crc32(name.encode()))
        work += [(t, key, i, mean, std) for i in range(max(1, -(-t.numel() // _CHUNK))) if t.numel()]
    with ThreadPoolExecutor(max_workers=threads or torch.get_num_threads()) as pool:
        list(pool.map(lambda w: _fill_chunk(*w), work))
    return out


def random_state_dicts(cfg: VARConfig, seed: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Seeded random weights with the official key names, in the spirit of VAR's init (std
    sqrt(1/3C)); the head is scaled so logits have std ~2, which keeps top-k/top-p meaningful on
    a random model; biases and norm parameters are non-zero. Identical for a seed on every
    machine and thread count."""
    seed = check_seed(int(seed), "seed")
    var_m, vae_m = _meta_models(cfg)
    C = cfg.width
    jobs, fixed = [], {}
    for k, v in var_m.state_dict().items():
        if k in ("lvl_1L", "attn_bias_for_masking") or k.endswith("zero_k_bias"):
            continue
        if k.endswith("scale_mul_1H11"):
            fixed[k] = torch.full(v.shape, math.log(4.0))
            continue
        jobs.append(("var", k, tuple(v.shape)) + _role_std("var", k, v.shape, C))
    vae_keys = []
    for k, v in vae_m.state_dict().items():
        if k == "quantize.ema_vocab_hit_SV":
            fixed["vae." + k] = torch.zeros(v.shape)
        else:
            jobs.append(("vae", "vae." + k, tuple(v.shape)) + _role_std("vae", k, v.shape, C))
        vae_keys.append(k)
    filled = {**_random_fill(jobs, seed), **fixed}
    var_sd = {k: filled[k] for k in var_m.state_dict() if k in filled}
    var_sd.update(_var_buffers(cfg))
    vae_sd = {k: filled["vae." + k] for k in vae_keys}
    return var_sd, vae_sd


def _var_buffers(cfg: VARConfig) -> Dict[str, torch.Tensor]:
    lvl_1L, attn_bias = block_causal_buffers(cfg)
    out = {"lvl_1L": lvl_1L, "attn_bias_for_masking": attn_bias}
    for i in range(cfg.depth):
        out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(cfg.width)
    return out


def random_models(cfg: VARConfig, seed: int) -> Tuple[VAR, VQVAE]:
    var_sd, vae_sd = random_state_dicts(cfg, seed)
    var, vae = _meta_models(cfg)
    var.load_state_dict(var_sd, strict=True, assign=True)
    vae.load_state_dict(vae_sd, strict=True, assign=True)
    return var.eval().requires_grad_(False), vae.eval().requires_grad_(False)
