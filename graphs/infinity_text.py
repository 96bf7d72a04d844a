"""Prompts -> T5 encoder states for Infinity (DESIGN.md, "Infinity").

The official inference tokenizes with padding to 512 and truncation, runs the Flan-T5-XL encoder
with the attention mask and keeps each prompt's own tokens (the padded form plus the mask is the
same thing). `transformers` is optional (`pip install var-ssg[text]`); the generation loop itself
takes precomputed states (`TextCondition`) and never imports it.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple

import torch

from var_ssg.common.errors import ConfigError
from .infinity_generate import TextCondition

log = logging.getLogger(__name__)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("the T5 text encoder needs the `transformers` package: pip install 'var-ssg[text]' "
                          "(or pass precomputed prompt embeddings)") from None
    return transformers


def load_t5(path_or_id: str, dtype: torch.dtype = torch.float32):
    """(tokenizer, encoder) from a local folder or a Hugging Face id (the official loader reads
    the encoder in fp16 on the GPU; fp32 here, the CPU reference)."""
    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(path_or_id)
        enc = tf.T5EncoderModel.from_pretrained(path_or_id).to(dtype)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"cannot load the T5 encoder from {path_or_id!r}: {first}") from None
    return tok, enc.eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], tokenizer, encoder, max_length: int = 512) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (states B Lt Ct5 float32, mask B Lt bool), Lt = max_length."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("prompts must be a non-empty list of strings")
    t = tokenizer(list(prompts), max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    states = encoder(input_ids=t.input_ids, attention_mask=t.attention_mask).last_hidden_state.float()
    return states, t.attention_mask.bool()


def text_condition(prompts: Sequence[str], tokenizer, encoder, max_length: int = 512,
                   negative: Optional[Sequence[str]] = None) -> TextCondition:
    """The prompts (and optional negative prompts, one per prompt) as the loop takes them."""
    e, m = encode_prompts(prompts, tokenizer, encoder, max_length)
    if negative is None:
        return TextCondition(e, m)
    if len(negative) != len(prompts):
        raise ConfigError(f"{len(negative)} negative prompts for {len(prompts)} prompts: give one per prompt")
    ne, nm = encode_prompts(negative, tokenizer, encoder, max_length)
    return TextCondition(e, m, ne, nm)
