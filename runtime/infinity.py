"""Infinity's K-scale loop over a backend (DESIGN.md, "Infinity"), the VAR
pipeline's design with text in front:

    text   = T5 states + mask per row (and a negative prompt's, or the learned empty prompt),
             padded to the preset's text length: computed once per request by the T5 encoder
             (eager, graphs.infinity_text) and the backend's text graph -> cond, text K/V
    noise  = per row, from that row's own seed: one uniform per bit, drawn in scale order
             (runtime.noise.uniforms: torch.rand's numbers for seeds below 2**32)
    sched  = the aspect ratio's schedule; the step graph's `scale_*` constants are computed
             here from it (graphs.infinity_io.scale_constants, numpy)
    cache  = empty(L, depth, 2, 2B, H, hd) once per run; scale k writes kv[L_k : L_k + n_k]
    for k: outs = backend.step(sched, k, feeds, kv_out)   (bits, logits, logits_cfg, summed_out)
    image  = backend.decode(summed as B d H W)

The host side is numpy; a backend's outputs are fed back as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import SSGConfig, check_seed, parse_ssg_beta
from var_ssg.graphs.infinity_config import InfinityConfig, InfinityRunConfig, ScaleSchedule
from var_ssg.graphs.infinity_io import prev_rows, scale_constants

from .backends.base import InfinityInfo  # noqa: F401 (the pipeline's `info`)
from .noise import uniforms

DEFAULT_CFG = 3.0               # the official run_infinity default
DEFAULT_TAU = 1.0
DEFAULT_TOP_P = 0.97
DEFAULT_BETA = "0"              # SSG off unless asked (ours: no published values for Infinity)


@dataclass(frozen=True)
class PromptRow:
    """One image request. `text`/`mask`: T5 states (Lt, Ct5) and mask (Lt,); `neg_*`: a negative
    prompt's (else the learned empty prompt). cfg/tau: one value, or one per scale."""
    text: np.ndarray
    mask: np.ndarray
    seed: int = 0
    cfg: Union[float, Tuple[float, ...]] = DEFAULT_CFG
    tau: Union[float, Tuple[float, ...]] = DEFAULT_TAU
    top_k: int = 0                  # over a bit's two values: 0 = off, 1 = greedy
    top_p: float = DEFAULT_TOP_P    # 0 = off
    ssg_beta: Union[str, Tuple[float, ...]] = DEFAULT_BETA
    neg_text: Optional[np.ndarray] = None
    neg_mask: Optional[np.ndarray] = None


@dataclass
class InfinityResult:
    images: np.ndarray                                      # B 3 H W float32 in [0, 1]
    bits: List[np.ndarray]                                  # K x (B, n_k, d_vae) int64: each step's own draw
    logits: List[np.ndarray] = field(default_factory=list)       # after CFG + SSG (on request)
    logits_cfg: List[np.ndarray] = field(default_factory=list)   # after CFG (on request)
    noise: List[np.ndarray] = field(default_factory=list)        # K x (B, n_k, d_vae)
    summed: Optional[np.ndarray] = None                     # B d H W: what the decoder reads
    schedule: Optional[ScaleSchedule] = None


def _per_scale(v, K: int, what: str) -> Tuple[float, ...]:
    vals = (float(v),) * K if isinstance(v, (int, float, np.floating, np.integer)) else tuple(float(x) for x in v)
    if len(vals) != K:
        raise ConfigError(f"{what}: {len(vals)} values for {K} scales; give one value or {K}")
    return vals


@lru_cache(maxsize=64)
def _consts(cfg: InfinityConfig, sched: ScaleSchedule, transform: str, k: int) -> Dict[str, np.ndarray]:
    return scale_constants(cfg, sched, transform, k)


class InfinityPipeline:
    def __init__(self, backend):
        self.backend = backend
        self.info: InfinityInfo = backend.info

    def check_row(self, row: PromptRow, K: int):
        """-> (run config, betas (K−1)), or a ConfigError that says what to change."""
        c = self.info.cfg
        check_seed(int(row.seed) if isinstance(row.seed, np.integer) else row.seed, "seed")
        run = InfinityRunConfig(cfg=_per_scale(row.cfg, K, "--cfg"), tau=_per_scale(row.tau, K, "--tau"),
                                top_k=int(row.top_k), top_p=float(row.top_p))
        betas = parse_ssg_beta(row.ssg_beta, K) if isinstance(row.ssg_beta, str) else tuple(map(float, row.ssg_beta))
        if len(betas) != K - 1:
            raise ConfigError(f"SSG schedule has {len(betas)} values, expected {K - 1}")
        SSGConfig(betas=betas, transform=self.info.transform)
        for t, m, what in ((row.text, row.mask, "prompt"), (row.neg_text, row.neg_mask, "negative prompt")):
            if t is None and m is None:
                continue
            t, m = np.asarray(t), np.asarray(m)
            if t.ndim != 2 or t.shape[1] != c.text_dim or m.shape != t.shape[:1] or t.shape[0] > c.text_maxlen:
                raise ConfigError(f"{what} states must be (Lt <= {c.text_maxlen}, {c.text_dim}) with a mask (Lt,): "
                                  f"got {t.shape} and {m.shape} (the T5 encoder {c.t5 or 'of the preset'} gives them)")
            if not np.asarray(m).astype(bool).any():
                raise ConfigError(f"every {what} needs at least one token (its mask is all zero)")
        return run, betas

    def _pad(self, x: Optional[np.ndarray], Lt: int, width: Optional[int]) -> np.ndarray:
        if x is None:
            return np.zeros((Lt, width) if width else (Lt,), np.float32)
        x = np.asarray(x, np.float32)
        out = np.zeros((Lt,) + x.shape[1:], np.float32)
        out[:x.shape[0]] = x
        return out

    def run(self, rows: Sequence[PromptRow], aspect_ratio: float = 1.0, keep_logits: bool = False,
            force_bits: Optional[Sequence] = None, decode: bool = True,
            progress: Optional[Callable[[int], None]] = None) -> InfinityResult:
        """One image per row. `force_bits` (K x (len(rows), n_k, d_vae)): drive the codes with these
        bits (teacher forcing; the result's bits stay the backend's own draws)."""
        info, c, be = self.info, self.info.cfg, self.backend
        rows = list(rows)
        if not rows:
            raise ConfigError("give at least one prompt")
        sched = c.schedule(aspect_ratio)
        K = sched.num_scales
        checked = [self.check_row(r, K) for r in rows]
        n_real = len(rows)
        B = info.batch or n_real
        if n_real > B:
            raise ConfigError(f"{n_real} prompts but the artifacts were exported for batch {B}: give at most {B}, "
                              f"or re-export with --batch {n_real}")
        rows, checked = rows + [rows[0]] * (B - n_real), checked + [checked[0]] * (B - n_real)
        Lt, f32 = c.text_maxlen, np.float32
        text = dict(text=np.stack([self._pad(r.text, Lt, c.text_dim) for r in rows]),
                    text_mask=np.stack([self._pad(r.mask, Lt, None) for r in rows]),
                    neg_text=np.stack([self._pad(r.neg_text, Lt, c.text_dim) for r in rows]),
                    neg_mask=np.stack([self._pad(r.neg_mask, Lt, None) for r in rows]),
                    use_neg=np.array([0.0 if r.neg_text is None else 1.0 for r in rows], f32))
        enc = be.encode(text)
        counts = [h * w * c.d_vae for h, w in sched.hw]
        drawn = [uniforms(r.seed, counts) for r in rows]
        noise = [np.stack([d[k] for d in drawn]).reshape(B, -1, c.d_vae) for k in range(K)]
        runs = [ch[0] for ch in checked]
        cfgs = np.array([r.cfg for r in runs], f32)                                   # B K
        taus = np.array([r.tau for r in runs], f32)
        betas = np.array([[0.0] + list(ch[1]) for ch in checked], f32)
        per_row = dict(top_k=np.array([r.top_k_pair for r in runs], np.int64),
                       top_p=np.array([r.top_p_threshold for r in runs], f32),
                       force=np.full((B,), 1.0 if force_bits is not None else 0.0, f32))
        kv = be.alloc_kv((sched.L, c.depth, 2, 2 * B, c.num_heads, c.head_dim))
        fh, fw = c.vae_hw(sched.hw[-1])
        summed = np.zeros((B, fh * fw, c.vae.bits), f32)
        prev = np.zeros((B, prev_rows(sched, 0), c.V), f32)
        res = InfinityResult(images=np.empty(0, f32), bits=[], schedule=sched)
        kept: Dict[str, list] = dict(bits=[], logits=[], logits_cfg=[])
        b = 0
        for k, (h, w) in enumerate(sched.hw):
            n = h * w
            forced = np.zeros((B, n, c.d_vae), np.int64)
            if force_bits is not None:
                forced[:n_real] = np.asarray(force_bits[k])
            feeds = dict(enc, summed=summed, noise=noise[k], cfg=np.ascontiguousarray(cfgs[:, k]),
                         tau=np.ascontiguousarray(taus[:, k]), beta=np.ascontiguousarray(betas[:, k]),
                         past_kv=kv[:b], prev_logits=prev, forced=forced, **per_row,
                         **_consts(c, sched, info.transform, k))
            out = be.step(sched, k, feeds, kv[b:b + n])
            summed, prev = out["summed_out"], out["logits_cfg"]
            kept["bits"].append(out["bits"])
            res.noise.append(noise[k][:n_real])
            if keep_logits:
                kept["logits"].append(out["logits"])
                kept["logits_cfg"].append(out["logits_cfg"])
            b += n
            if progress:
                progress(k)
        del kv, feeds       # the cache (11 GB for infinity-2b at 1024 px) goes before the decoder runs
        for name, arrays in kept.items():
            setattr(res, name, [be.host(a)[:n_real].copy() for a in arrays])
        grid = be.host(summed).transpose(0, 2, 1).reshape(B, c.vae.bits, fh, fw)
        res.summed = grid[:n_real].copy()
        if decode:
            res.images = be.host(be.decode(np.ascontiguousarray(grid)))[:n_real]
        return res


def is_infinity(model: Optional[str] = None, artifacts: Optional[str] = None) -> bool:
    """Whether a command's source is Infinity: a preset name infinity-*, or artifacts whose
    manifest says family "infinity" (read without hashing; the open verifies everything)."""
    if model and str(model).startswith("infinity-"):
        return True
    if artifacts:
        from var_ssg.contract.filecheck import read_manifest
        from var_ssg.contract.schema import family_of
        try:
            return family_of(read_manifest(artifacts)) == "infinity"
        except (ConfigError, OSError):
            return False            # the full open reports what is wrong with the directory
    return False


def open_infinity(artifacts: Optional[str] = None, backend: Optional[str] = None, model: Optional[str] = None,
                  ckpt: Optional[str] = None, vae_ckpt: Optional[str] = None, random_init: Optional[int] = None,
                  transform: str = "dct", device: str = "cpu", threads: int = 0,
                  verify: str = "stamp") -> Tuple[InfinityPipeline, str]:
    """(pipeline, weights note): artifacts on onnxruntime (default), tensorrt (artifacts exported
    with --target trt; on the GPU) or eager (the weights the manifest names), or a preset's
    weights on eager."""
    name = backend or ("onnxruntime" if artifacts else "eager")
    if name not in ("eager", "onnxruntime", "tensorrt"):
        raise ConfigError(f"--backend {name}: Infinity runs on eager, onnxruntime and tensorrt")
    if device != "cpu" and name == "onnxruntime":
        raise ConfigError("Infinity on onnxruntime runs on --device cpu here (CUDA is not wired for it yet)")
    if name == "tensorrt" and device != "cuda":
        raise ConfigError(f"--backend tensorrt runs Infinity's engines on the GPU: pass --device cuda, not {device}")
    if artifacts:
        from var_ssg.contract.manifest import load_manifest
        man = load_manifest(artifacts, verify=verify)
        if man.family != "infinity":
            raise ConfigError(f"{artifacts} holds {man.cfg.name} artifacts (VAR), not Infinity: give Infinity "
                              f"artifacts (scripts/export.py --model infinity-...)")
        if model and model != man.cfg.name:
            raise ConfigError(f"--model {model} but the artifacts in {artifacts} are {man.cfg.name}")
        if name == "onnxruntime":
            from .backends.infinity_ort import InfinityOrtBackend
            be = InfinityOrtBackend(man, threads=threads)
        elif name == "tensorrt":
            from .backends.infinity_trt import InfinityTrtBackend
            be = InfinityTrtBackend(man, device=device)
        else:
            from .backends.infinity_eager import InfinityEagerBackend
            be = InfinityEagerBackend.from_manifest(man, device=device)
        return InfinityPipeline(be), be.source_note
    if name != "eager":
        raise ConfigError(f"--backend {name} needs --artifacts DIR (run scripts/export.py --model {model or 'infinity-...'} first)")
    if not model:
        raise ConfigError("give --model (e.g. infinity-tiny) or --artifacts DIR")
    from var_ssg.graphs.infinity_config import get_infinity_preset
    from var_ssg.graphs.infinity_weights import load_infinity
    from .backends.infinity_eager import InfinityEagerBackend
    m, vae, src = load_infinity(get_infinity_preset(model), ckpt, vae_ckpt, random_init)
    be = InfinityEagerBackend(m, vae, transform=transform, device=device, source_note=src.describe())
    return InfinityPipeline(be), be.source_note
