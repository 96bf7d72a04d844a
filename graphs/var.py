"""The VAR transformer as a plain nn.Module, state-dict compatible with FoundationVision/VAR.

It knows nothing about guidance, sampling or caching policy: `forward_step` takes this scale's
tokens plus the past keys/values and returns hidden states and the new keys/values; the
caller (graphs.step) owns the cache.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VARConfig


def block_causal_buffers(cfg: VARConfig):
    """The official non-parameter tensors: lvl_1L (scale index of each token) and the
    block-causal attention bias (a token sees every token of its own and earlier scales)."""
    L = cfg.L
    d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)]).view(1, L, 1)
    dT = d.transpose(1, 2)
    return dT[:, 0].contiguous(), torch.where(d >= dT, 0.0, -torch.inf).reshape(1, 1, L, L).contiguous()


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden)
        self.fc2 = nn.Linear(hidden, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Multi-head attention with VAR's l2-normalised q/k and learned per-head scale."""

    def __init__(self, C: int, heads: int, l2_norm: bool):
        super().__init__()
        self.H, self.hd, self.l2_norm = heads, C // heads, l2_norm
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = 0.25 / math.sqrt(self.hd)
        self.proj = nn.Linear(C, C)

    def qkv(self, x_BlC: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, l, C = x_BlC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BlC, self.mat_qkv.weight, bias).view(B, l, 3, self.H, self.hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)          # each B H l hd
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            k = F.normalize(k, dim=-1)
        return q, k, v

    def attend(self, q, k, v, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        # q: B H l hd; k, v: B H Lall hd
        B, H, l, hd = q.shape
        w = (q * self.scale) @ k.transpose(-2, -1)               # B H l Lall
        if attn_bias is not None:
            w = w + attn_bias
        o = w.softmax(dim=-1) @ v                                # B H l hd
        return self.proj(o.transpose(1, 2).reshape(B, l, H * hd))


class LayerNormF32(nn.LayerNorm):
    """LayerNorm with float32 statistics whatever the input's dtype, written into the graph
    itself (Cast -> LayerNormalization -> Cast for fp16/bf16; nothing extra for fp32): a
    strongly typed TensorRT network computes in the types the graph states, so the ONNX
    `stash_type` attribute alone is not relied on (DESIGN.md "TensorRT runtime")."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class AdaLNSelfAttn(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.width
        self.C = C
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = LayerNormF32(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if cfg.shared_aln:      # this block's offset to the shared projection (official name)
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def modulation(self, cond):
        """cond: the class embedding (B D), or with shared AdaLN the shared projection (B 1 6 C)."""
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)                          # 6 x B1C
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)          # 6 x B1C

    def forward(self, x, cond, past_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                attn_bias: Optional[torch.Tensor] = None):
        """x: B l C; cond: see `modulation`. past_kv: (k, v) each B H Lpast hd, or None.
        Returns x and this step's (k, v)."""
        g1, g2, s1, s2, sh1, sh2 = self.modulation(cond)
        q, k, v = self.attn.qkv(self.ln_wo_grad(x) * (s1 + 1) + sh1)
        if past_kv is not None:
            k_all = torch.cat((past_kv[0], k), dim=2)   # graph-level concat; the runtime cache is preallocated
            v_all = torch.cat((past_kv[1], v), dim=2)
        else:
            k_all, v_all = k, v
        x = x + self.attn.attend(q, k_all, v_all, attn_bias) * g1
        x = x + self.ffn(self.ln_wo_grad(x) * (s2 + 1) + sh2) * g2
        return x, k, v


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = LayerNormF32(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BlC, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BlC) * (scale + 1) + shift


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.width, cfg.L
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, cfg.patch_nums[0] ** 2, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(cfg.num_scales, C)
        # shared AdaLN: one SiLU+Linear(D, 6C) for all blocks, as official `shared_ada_lin`
        # (nn.Identity without it: no parameters, so per-block state dicts are unchanged)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if cfg.shared_aln else nn.Identity()
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg) for _ in range(cfg.depth)])
        # buffers present in the official state dict
        lvl_1L, attn_bias = block_causal_buffers(cfg)
        self.register_buffer("lvl_1L", lvl_1L)
        self.register_buffer("attn_bias_for_masking", attn_bias)
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.V)

    # ---- pieces of one step ------------------------------------------------------------
    def cond(self, label_B: torch.Tensor) -> torch.Tensor:
        """Class embedding of [labels, unconditional] -> 2B x D. A label < 0 is the official
        unconditional id (num_classes), as in autoregressive_infer_cfg(label_B=-1)."""
        uncond = torch.full_like(label_B, self.cfg.num_classes)
        label_B = torch.where(label_B < 0, uncond, label_B)
        return self.class_emb(torch.cat((label_B, uncond), dim=0))

    def lvl_pos(self, k: int) -> torch.Tensor:
        b, e = self.cfg.begin_ends[k]
        return self.lvl_embed.weight[k].view(1, 1, -1) + self.pos_1LC[:, b:e]     # 1 n_k C

    def first_tokens(self, cond_BD: torch.Tensor) -> torch.Tensor:
        n0 = self.cfg.patch_nums[0] ** 2
        return cond_BD.unsqueeze(1).expand(-1, n0, -1) + self.pos_start + self.lvl_pos(0)

    def next_tokens(self, k: int, x_Bhw_Cv: torch.Tensor) -> torch.Tensor:
        """x: B n_k Cvae (downsampled f_hat) -> 2B n_k C (duplicated for CFG)."""
        x = self.word_embed(x_Bhw_Cv) + self.lvl_pos(k)
        return torch.cat((x, x), dim=0)

    def block_cond(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """What every block is conditioned on: the class embedding itself (each block has its
        own ada_lin), or with shared AdaLN the one projection all blocks share (2B 1 6 C)."""
        if not self.cfg.shared_aln:          # static config branch: fine inside exported graphs
            return cond_BD
        return self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.cfg.width)

    def blocks_forward(self, x, cond_BD, past: Optional[List[Tuple[torch.Tensor, torch.Tensor]]],
                       attn_bias=None):
        """cond_BD is the class embedding for both AdaLN forms; the head keeps using it as is."""
        blk_cond = self.block_cond(cond_BD)
        ks, vs = [], []
        for i, b in enumerate(self.blocks):
            x, k, v = b(x, blk_cond, None if past is None else past[i], attn_bias)
            ks.append(k)
            vs.append(v)
        return x, ks, vs

    def logits(self, x, cond_BD) -> torch.Tensor:
        return self.head(self.head_nm(x, cond_BD)).float()

    # ---- teacher forcing (training-style full sequence), used to check the cache -------
    def forward_teacher(self, label_B: torch.Tensor, x_BLCv_wo_first: torch.Tensor) -> torch.Tensor:
        """Full-sequence forward with the block-causal mask: logits for all L tokens of the
        2B rows [cond; uncond] (labels duplicated with the unconditional id)."""
        cond = self.cond(label_B)
        x0 = self.first_tokens(cond)
        rest = self.word_embed(x_BLCv_wo_first)
        rest = torch.cat((rest, rest), 0)
        n0 = self.cfg.patch_nums[0] ** 2
        x = torch.cat((x0, rest + self.lvl_embed(self.lvl_1L[:, n0:]) + self.pos_1LC[:, n0:]), dim=1)
        x, _, _ = self.blocks_forward(x, cond, None, self.attn_bias_for_masking)
        return self.logits(x, cond)
