"""The eager reference generation loop of Infinity (DESIGN.md, "Infinity").

Text conditioning comes in as precomputed encoder states and a mask (`TextCondition`, the
`prompt_embeds` form), so the loop needs no T5; `graphs.infinity_text` turns prompts into one.
The uniforms (one per bit) are supplied by the caller, as for VAR.

    per request:  text (cond ‖ uncond: the negative prompt or the learned empty prompt)
                  -> cond_BD, gss, every block's text keys/values
    per scale k:  tokens -> blocks (KV cache) -> bit logits (2B) -> CFG -> SSG -> bits
                  -> codes (B d h w) -> summed at the final grid (bilinear up)
                  -> next input: summed resized to the next grid -> word_embed
    at the end:   BSQ decoder(summed) -> image in [-1, 1]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .bitwise import bit_prior, bits_to_grid, cfg_combine, grid_to_tokens, resize_codes, sample_bits, ssg
from .config import SSGConfig
from .infinity import Infinity, rope_tables
from .infinity_config import InfinityRunConfig, ScaleSchedule
from .infinity_vae import BSQVAE


@dataclass
class TextCondition:
    """Encoder states B Lt Ct5 and mask B Lt (True/1 = token); an optional negative prompt in
    the same form (else the model's learned empty prompt)."""
    embeds: torch.Tensor
    mask: torch.Tensor
    neg_embeds: Optional[torch.Tensor] = None
    neg_mask: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.embeds.dim() != 3 or self.mask.shape != self.embeds.shape[:2]:
            raise ValueError(f"embeds must be B Lt C and mask B Lt, got {tuple(self.embeds.shape)} and {tuple(self.mask.shape)}")
        if (self.neg_embeds is None) != (self.neg_mask is None):
            raise ValueError("neg_embeds and neg_mask go together")
        if not bool(self.mask.bool().any(-1).all()):
            raise ValueError("every prompt needs at least one token (the mask of a row is all zero)")


@dataclass
class Generation:
    bits: List[torch.Tensor] = field(default_factory=list)        # per scale: B n d_vae (int64)
    logits_cfg: List[torch.Tensor] = field(default_factory=list)  # per scale: B n V (before SSG)
    logits: List[torch.Tensor] = field(default_factory=list)      # per scale: B n V (after SSG)
    summed: Optional[torch.Tensor] = None                         # B d H W (final grid)
    image: Optional[torch.Tensor] = None                          # B 3 H W in [-1, 1]


def _pair_text(model: Infinity, text: TextCondition):
    """cond rows then uncond rows, padded to one length: (2B Lt Ct5, 2B Lt bool)."""
    e, m = text.embeds.float(), text.mask.bool()
    B, Lt = m.shape
    if Lt > model.cfg.text_maxlen:
        raise ValueError(f"{Lt} text positions; the model takes at most {model.cfg.text_maxlen}")
    for x in (e, text.neg_embeds):
        if x is not None and x.shape[-1] != model.cfg.text_dim:
            raise ValueError(f"text states of width {x.shape[-1]}; {model.cfg.name} takes {model.cfg.text_dim} "
                             f"(the T5 encoder it was trained with: {model.cfg.t5 or 'see its preset'})")
    if text.neg_embeds is None:
        ne, nm = model.uncond_text(B, Lt).to(e.dtype), m          # the official: the row's own length
    else:
        ne, nm = text.neg_embeds.float(), text.neg_mask.bool()
        L2 = max(Lt, nm.shape[1])
        pad = lambda x, L: torch.nn.functional.pad(x, (0, 0, 0, L - x.shape[1]) if x.dim() == 3 else (0, L - x.shape[1]))
        e, m, ne, nm = pad(e, L2), pad(m, L2), pad(ne, L2), pad(nm, L2)
    return torch.cat((e, ne)), torch.cat((m, nm))


@torch.no_grad()
def generate(model: Infinity, vae: Optional[BSQVAE], text: TextCondition, sched: ScaleSchedule,
             run: InfinityRunConfig, noise: List[torch.Tensor], ssg_cfg: Optional[SSGConfig] = None,
             keep_logits: bool = False) -> Generation:
    """noise[k]: B n_k d_vae uniforms in [0, 1). ssg_cfg None or beta 0: no SSG. vae None: stop
    at the summed codes."""
    cfg = model.cfg
    K = sched.num_scales
    if len(run.cfg) != K or len(noise) != K:
        raise ValueError(f"{K} scales: need {K} cfg/tau values and {K} noise tensors")
    B = text.embeds.shape[0]
    t2, m2 = _pair_text(model, text)
    cond, gss, ca_kv = model.encode_text(t2, m2)
    text_kvs = model.text_kvs(ca_kv)
    final = cfg.vae_hw(sched.hw[-1])
    summed = torch.zeros(B, cfg.vae.bits, *final)
    x = model.first_tokens(cond)
    past = None
    prev_g = None
    out = Generation()
    for k, hw in enumerate(sched.hw):
        h, new = model.blocks_forward(x, k, gss, text_kvs, m2, rope_tables(cfg, sched, k), past)
        past = new if past is None else [(torch.cat((p[0], n[0]), 2), torch.cat((p[1], n[1]), 2))
                                         for p, n in zip(past, new)]
        g = cfg_combine(model.logits(h, cond), run.cfg[k])
        beta = 0.0 if ssg_cfg is None else ssg_cfg.beta(k)
        prior = bit_prior(prev_g, sched.hw[k - 1], hw, ssg_cfg.transform) if k > 0 and beta != 0 else None
        lg = ssg(g, prior, beta)
        prev_g = g
        bits = sample_bits(lg, noise[k], run.tau[k], run.top_k_pair, run.top_p_threshold)
        out.bits.append(bits)
        if keep_logits:
            out.logits_cfg.append(g)
            out.logits.append(lg)
        codes = vae_codes(bits, hw, cfg.vae.bits, cfg.spatial_patchify)
        if k < K - 1:
            summed = summed + resize_codes(codes, final)
            nxt = resize_codes(summed, cfg.vae_hw(sched.hw[k + 1]))
            x = model.next_tokens(grid_to_tokens(nxt, cfg.spatial_patchify)).repeat(2, 1, 1)
        else:
            summed = summed + codes
    out.summed = summed
    if vae is not None:
        out.image = vae.decode(summed)
    return out


def vae_codes(bits_Bnd: torch.Tensor, hw, bits: int, patchify: bool) -> torch.Tensor:
    """Sampled bits of one scale -> codes at VAE positions, B d H W."""
    grid = bits_to_grid(bits_Bnd, hw, patchify)
    return (grid.float() * 2 - 1) / (bits ** 0.5)

