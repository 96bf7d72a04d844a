"""The Infinity transformer as plain modules with the official state-dict names (DESIGN.md,
"Infinity").

    text (B Lt Ct5), mask ──text_norm──┬─ text_proj_for_sos (attentive pool) ─► cond_BD (= sos)
                                       └─ text_proj_for_ca (MLP) ─────────────► ca_kv (B Lt D)
    cond_BD ── shared_ada_lin ─► gss (B 1 6 C), shared by every block (+ its own ada_gss)
    x (sos + pos_start | word_embed(codes)) + lvl_embed[k]
        └► block × depth: x += γ1·SA(AdaLN(x)) [cosine attention, RoPE-2D, KV cache]
                          x += CA(LayerNorm(x), ca_kv, mask)
                          x += γ2·FFN(AdaLN(x))
        └► head_nm (AdaLN from cond_BD) → head → 2 logits per token channel (bit 0 / bit 1)

Text is given padded (B, Lt) with a mask, the same attention as the official packed
variable-length form. Shapes in names: x_BnC, text_BLT, mask_BL.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .infinity_config import InfinityConfig, ScaleSchedule

MAX_SCALE_MUL = math.log(100.0)


class RMSNorm(nn.Module):
    """The official FastRMSNorm (fp32): x · rsqrt(mean(x²) + eps) · weight."""

    def __init__(self, C: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _masked_attention(q, k, v, mask_BL: Optional[torch.Tensor], scale: float):
    """q: B H n c, k/v: B H Lt c, mask_BL: True where the text token exists."""
    bias = None
    if mask_BL is not None:
        bias = torch.zeros(mask_BL.shape, dtype=q.dtype, device=q.device).masked_fill(~mask_BL, -torch.inf)
        bias = bias[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


class CrossAttention(nn.Module):
    """Attention from tokens (or, as the pool, from one learned query per head) to text keys
    and values. Official names: mat_q, mat_kv (no bias: k has none, v has v_bias), proj."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.pool = for_attn_pool
        if for_attn_pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim, bias=True)
        self.mat_kv = nn.Linear(kv_dim, embed_dim * 2, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def text_kv(self, kv_BLD: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the text, once per request: each B H Lt c."""
        B, L, _ = kv_BLD.shape
        kv = F.linear(kv_BLD, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = kv.view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, q_BnC: Optional[torch.Tensor], kv: Tuple[torch.Tensor, torch.Tensor],
                mask_BL: Optional[torch.Tensor]) -> torch.Tensor:
        k, v = kv
        B = k.shape[0]
        if self.pool:
            q = self.mat_q.unsqueeze(2).expand(B, -1, 1, -1)                           # B H 1 c
        else:
            n = q_BnC.shape[1]
            q = self.mat_q(q_BnC).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        o = _masked_attention(q, k, v, mask_BL, 1 / math.sqrt(self.head_dim))        # B H n c
        return self.proj(o.transpose(1, 2).reshape(B, o.shape[2], -1))


class TextAttentivePool(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.ca = CrossAttention(cfg.width, cfg.text_dim, cfg.pool_heads, for_attn_pool=True)

    def forward(self, text_BLT, mask_BL):
        return self.ca(None, self.ca.text_kv(text_BLT), mask_BL).squeeze(1)            # B D


def rope_tables(cfg: InfinityConfig, sched: ScaleSchedule, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (n_k, head_dim/2) of the rotary pairs at scale k. The first half of the pairs
    rotate with the row, the second with the column; a grid (h, w) is spread over the template's
    full 1M grid (H, W): row i sits at round(i·H/h) (the official `rope2d_normalized_by_hw=2`,
    float32 arithmetic, round half to even)."""
    h, w = sched.hw[k]
    H, W = sched.full
    half = cfg.head_dim // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))    # half/2
    rows = (torch.arange(h) * (H / h)).round().int()
    cols = (torch.arange(w) * (W / w)).round().int()
    if int(rows.max()) >= cfg.rope_grid or int(cols.max()) >= cfg.rope_grid:
        raise ValueError(f"RoPE position beyond the {cfg.rope_grid}-entry table")
    ang_r = torch.outer(rows.float(), inv)                                              # h half/2
    ang_c = torch.outer(cols.float(), inv)                                              # w half/2
    ang = torch.cat((ang_r[:, None, :].expand(h, w, -1), ang_c[None, :, :].expand(h, w, -1)), -1)
    ang = ang.reshape(h * w, half)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: B H n c; consecutive pairs (x[2i], x[2i+1]) rotate by the angle of pair i."""
    xp = x.reshape(*x.shape[:-1], -1, 2)
    a, b = xp[..., 0], xp[..., 1]
    return torch.stack((cos * a - sin * b, sin * a + cos * b), -1).reshape(x.shape)


class SelfAttention(nn.Module):
    """Cosine attention: q, k l2-normalised, q scaled by exp(min(scale_mul, log 100)) per head,
    RoPE-2D after the normalisation, softmax scale 1; this scale's keys/values are appended to
    the past (the KV cache holds scales 0..k-1, all visible)."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C, H = cfg.width, cfg.num_heads
        self.num_heads, self.head_dim = H, C // H
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.proj = nn.Linear(C, C)

    def forward(self, x_BnC, rope, past: Optional[Tuple[torch.Tensor, torch.Tensor]], attn_bias=None,
                heads_per_chunk: int = 0):
        """attn_bias: None (a cached scale: everything visible) or an additive n x n mask (the
        teacher-forced whole sequence). heads_per_chunk > 0: attention over that many heads at a
        time, concatenated (the same numbers; an exported graph then holds one chunk's score
        table at a time: DESIGN.md, "Infinity")."""
        B, n, C = x_BnC.shape
        qkv = F.linear(x_BnC, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)))
        q, k, v = qkv.view(B, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1, eps=1e-12) * self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        k = F.normalize(k, dim=-1, eps=1e-12)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        new = (k, v)
        if past is not None:
            k, v = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
        H = self.num_heads
        if 0 < heads_per_chunk < H:
            o = torch.cat([F.scaled_dot_product_attention(q[:, h:h + heads_per_chunk], k[:, h:h + heads_per_chunk],
                                                          v[:, h:h + heads_per_chunk], attn_mask=attn_bias, scale=1.0)
                           for h in range(0, H, heads_per_chunk)], 1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)
        return self.proj(o.transpose(1, 2).reshape(B, n, C)), new


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CrossAttnBlock(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.width
        self.C, self.eps = C, cfg.norm_eps
        self.sa = SelfAttention(cfg)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ffn = FFN(C, cfg.ffn_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))

    def _ada(self, x, scale, shift):
        return F.layer_norm(x.float(), (self.C,), eps=self.eps) * (scale + 1) + shift

    def forward(self, x_BnC, gss_B16C, text_kv, mask_BL, rope, past=None, attn_bias=None, heads_per_chunk: int = 0):
        """-> (x, (k, v) of this scale: B H n c each)."""
        g1, g2, s1, s2, b1, b2 = (self.ada_gss + gss_B16C).unbind(2)                  # B 1 C each
        a, new = self.sa(self._ada(x_BnC, s1, b1), rope, past, attn_bias, heads_per_chunk)
        x = x_BnC + a * g1
        x = x + self.ca(self.ca_norm(x), text_kv, mask_BL)
        x = x + self.ffn(self._ada(x, s2, b2)) * g2
        return x, new


class BlockChunk(nn.Module):
    """The official `MultipleLayers` (state-dict names `block_chunks.i.module.j.*`)."""

    def __init__(self, blocks: List[CrossAttnBlock]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.C, self.eps = cfg.width, cfg.norm_eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))

    def forward(self, x_BnC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return F.layer_norm(x_BnC.float(), (self.C,), eps=self.eps) * (scale + 1) + shift


class Infinity(nn.Module):
    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C, T = cfg.width, cfg.text_dim
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, T))
        self.text_norm = RMSNorm(T, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(T, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        self.word_embed = nn.Linear(cfg.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        per = cfg.depth // cfg.block_chunks
        self.block_chunks = nn.ModuleList(
            BlockChunk([CrossAttnBlock(cfg) for _ in range(per)]) for _ in range(cfg.block_chunks))
        self.head_nm = AdaLNBeforeHead(cfg)
        self.head = nn.Linear(C, cfg.V)

    @property
    def blocks(self) -> List[CrossAttnBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    # ------------------------------------------------------------ per request
    def uncond_text(self, B: int, Lt: int) -> torch.Tensor:
        """The learned empty prompt: its first Lt rows (the official loop takes a row's own
        length from it; positions past the row's length are masked out)."""
        return self.cfg_uncond[:Lt].unsqueeze(0).expand(B, -1, -1)

    def encode_text(self, text_BLT, mask_BL):
        """-> cond_BD (the pooled start token, also the AdaLN condition), gss (B 1 6 C) and
        ca_kv (B Lt D)."""
        t = self.text_norm(text_BLT)
        cond = self.text_proj_for_sos(t, mask_BL)
        ca_kv = self.text_proj_for_ca(t)
        gss = self.shared_ada_lin(cond).view(-1, 1, 6, self.cfg.width)
        return cond, gss, ca_kv

    def text_kvs(self, ca_kv: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Every block's cross-attention keys and values, computed once per request."""
        return [b.ca.text_kv(ca_kv) for b in self.blocks]

    # ------------------------------------------------------------ per scale
    def first_tokens(self, cond_BD):
        return cond_BD.unsqueeze(1) + self.pos_start

    def next_tokens(self, codes_BnD):
        return self.word_embed(codes_BnD)

    def blocks_forward(self, x_BnC, k: int, gss, text_kvs, mask_BL, rope, past):
        """One scale through every block: level embedding once (before the first block), then
        the blocks. past: list (depth) of (k, v) or None -> (x, list of this scale's (k, v))."""
        x = x_BnC + self.lvl_embed.weight[k]
        news = []
        for i, blk in enumerate(self.blocks):
            x, new = blk(x, gss, text_kvs[i], mask_BL, rope, None if past is None else past[i])
            news.append(new)
        return x, news

    def forward_teacher(self, x_BLC_wo_prefix, sched: ScaleSchedule, cond_BD, gss, text_kvs, mask_BL):
        """The whole sequence at once (the official training forward): the start token, then
        word_embed of every later scale's input (B, L − 1, d_vae); block-causal attention (a
        token sees its own and earlier scales), RoPE and level embedding by position. -> B L V."""
        x = torch.cat((self.first_tokens(cond_BD), self.next_tokens(x_BLC_wo_prefix)), 1)
        lvl = torch.cat([torch.full((h * w,), k) for k, (h, w) in enumerate(sched.hw)])
        tabs = [rope_tables(self.cfg, sched, k) for k in range(sched.num_scales)]
        rope = torch.cat([t[0] for t in tabs]), torch.cat([t[1] for t in tabs])
        bias = torch.zeros(len(lvl), len(lvl)).masked_fill(lvl[:, None] < lvl[None, :], -torch.inf)
        x = x + self.lvl_embed(lvl)
        for i, blk in enumerate(self.blocks):
            x, _ = blk(x, gss, text_kvs[i], mask_BL, rope, None, bias)
        return self.logits(x, cond_BD)

    def logits(self, x_BnC, cond_BD):
        """-> B n V: channel 2j+v is the logit of value v of token channel j."""
        return self.head(self.head_nm(x_BnC.float(), cond_BD.float()))
