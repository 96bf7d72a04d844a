"""Infinity over HTTP (DESIGN.md, "Serving prompts"): one prompt request → one checked
PromptRequest, with no Ray import (unit-tested without a server), and what the replicas do
with a batch of them.

    POST /v1/generate {"prompt": "a cat", "seed": 0, ["aspect_ratio": "3:4", "negative_prompt",
                       "cfg", "tau", "ssg_beta", "top_k", "top_p"]} → 200 image/png

The Frontend checks the request (types, an empty prompt, a prompt longer than the model's text
length counted by the replica's own tokenizer, the values through InfinityPipeline.check_row,
the CLI's checks) → 400 with what to fix. The replica encodes the prompts with the eager T5
(--text-encoder DIR) and runs the pipeline. Requests of one serve.batch that share an aspect
template run together; each other template runs as its own batch after it (`schedule_groups`),
since one pipeline run has one scale schedule.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence

from var_ssg.common.errors import ConfigError

from .requests import MAX_BODY, RequestError, ServeOptions, _beta, _int, _LongInt, _num, _parse_int, _show, too_large

log = logging.getLogger(__name__)

FIELDS = ("prompt", "seed", "aspect_ratio", "negative_prompt", "cfg", "tau", "ssg_beta", "top_k", "top_p")
EXAMPLE = '{"prompt": "a photo of a cat", "seed": 0, "aspect_ratio": "1:1"}'
MAX_PROMPT_CHARS = 8192            # far beyond any text length; tokenizing more is wasted work


@dataclass(frozen=True)
class PromptRequest:
    """A checked request: the prompt texts, the aspect template (its scale schedule) and the
    row's values (a runtime.infinity.PromptRow whose states the replica fills in)."""
    prompt: str
    negative_prompt: Optional[str]
    aspect_ratio: str                  # as sent (for the PNG note)
    template: float                    # the nearest aspect template: requests batch by it
    row: Any                           # PromptRow(text=None, mask=None, ...)


def _text(d: Dict[str, Any], key: str, tokenizer, maxlen: int) -> str:
    v = d[key]
    if not isinstance(v, str):
        raise RequestError(f"{key!r} must be a string, got {_show(v)}")
    if not v.strip():
        raise RequestError(f"{key!r} is empty; " + (f"describe the image, e.g. {EXAMPLE}" if key == "prompt" else
                           "leave it out (the model's learned empty prompt) or name what to avoid"))
    if len(v) > MAX_PROMPT_CHARS:
        raise RequestError(f"{key!r} has {len(v)} characters; this model reads at most {maxlen} tokens: shorten it")
    n = len(tokenizer(v).input_ids)
    if n > maxlen:
        raise RequestError(f"{key!r} is {n} tokens long; this model reads at most {maxlen} tokens (its text "
                           f"length): shorten it")
    return v


def _per_scale(d: Dict[str, Any], key: str):
    v = d[key]
    if isinstance(v, list):
        if not v or not all(isinstance(x, (int, float)) and not isinstance(x, (bool, str)) for x in v):
            raise RequestError(f"{key!r} must be a number or a list of numbers (one per scale), got {_show(v)}")
        try:
            return tuple(float(x) for x in v)
        except OverflowError:
            raise RequestError(f"{key!r} holds a number too large for a float") from None
    return _num(d, key)


def parse_prompt_request(body: bytes, pipe, tokenizer) -> PromptRequest:
    """JSON body -> a checked PromptRequest. Raises RequestError (400/413) with what to fix; the
    value checks are the CLI's (`pipe.check_row`, an InfinityPipeline)."""
    from var_ssg.graphs.infinity_config import nearest_template, parse_aspect_ratio
    from var_ssg.runtime.infinity import DEFAULT_TOP_P, PromptRow
    if len(body) > MAX_BODY:
        raise RequestError(too_large(len(body)), 413)
    try:
        d = json.loads(body, parse_int=_parse_int)
    except (ValueError, RecursionError) as e:
        msg = (f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError)
               else type(e).__name__)
        raise RequestError(f"malformed JSON ({msg}); send one object like {EXAMPLE}") from None
    if not isinstance(d, dict):
        raise RequestError(f"the body must be a JSON object like {EXAMPLE}, got {type(d).__name__}")
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
        hint = " (these artifacts are Infinity: text-to-image, send a prompt)" if "class" in unknown else ""
        raise RequestError(f"unknown field {unknown[0]!r:.40}{hint}; accepted fields: {', '.join(FIELDS)}")
    for key in ("prompt", "seed"):
        if key not in d:
            raise RequestError(f"missing {key!r}; send at least {EXAMPLE}")
    cfg = pipe.info.cfg
    prompt = _text(d, "prompt", tokenizer, cfg.text_maxlen)
    negative = _text(d, "negative_prompt", tokenizer, cfg.text_maxlen) if d.get("negative_prompt") is not None else None
    ratio = d.get("aspect_ratio", "1:1")
    if isinstance(ratio, bool) or not isinstance(ratio, (str, int, float)) or isinstance(ratio, _LongInt):
        raise RequestError(f"'aspect_ratio' must be \"H:W\" like \"3:4\" or h/w as a number, got {_show(ratio)}")
    try:
        template = nearest_template(parse_aspect_ratio(str(ratio)))
    except ConfigError as e:
        raise RequestError(f"'aspect_ratio': {e}") from None
    kw: Dict[str, Any] = dict(seed=_int(d, "seed", "0..2**63-1"), top_p=DEFAULT_TOP_P)
    for key in ("cfg", "tau"):
        if key in d:
            kw[key] = _per_scale(d, key)
    if "ssg_beta" in d:
        kw["ssg_beta"] = _beta(d["ssg_beta"])
    if "top_k" in d:
        kw["top_k"] = _int(d, "top_k", "over a bit's two values: 0 = off, 1 = greedy")
    if "top_p" in d:
        kw["top_p"] = _num(d, "top_p")
    row = PromptRow(text=None, mask=None, **kw)
    try:
        pipe.check_row(row, cfg.schedule(template).num_scales)
    except ConfigError as e:
        raise RequestError(str(e).replace("--cfg", "'cfg'").replace("--tau", "'tau'")) from None
    return PromptRequest(prompt=prompt, negative_prompt=negative, aspect_ratio=str(ratio), template=template, row=row)


class _InfoOnly:
    def __init__(self, info):
        self.info = info


def describe_infinity(man, backend: str, device: str):
    from var_ssg.runtime.backends.base import InfinityInfo
    return InfinityInfo(name=backend, cfg=man.cfg, transform=man.transform,
                        batch=None if backend == "eager" else man.batch, device=device)


def prompt_checker(info):
    """An InfinityPipeline that validates rows for `info` and runs nothing."""
    from var_ssg.runtime.infinity import InfinityPipeline
    return InfinityPipeline(_InfoOnly(info))


def infinity_summary(man, opts: ServeOptions) -> Dict[str, Any]:
    """GET /v1/model for Infinity artifacts."""
    from var_ssg.graphs.infinity_config import ASPECT_TEMPLATES
    from var_ssg.runtime.infinity import DEFAULT_BETA, DEFAULT_CFG, DEFAULT_TAU, DEFAULT_TOP_P
    cfg = man.cfg
    h, w = cfg.image_size(cfg.schedule(1.0))
    return dict(model=cfg.name, family="infinity", precision=man.precision, batch=man.batch, backend=opts.backend,
                device=opts.device, weights=man.weights["kind"], weights_source=man.source_note,
                random_weights=man.weights["kind"] == "random", text_maxlen=cfg.text_maxlen,
                text_encoder=opts.text_encoder, image_size_1_1=[h, w], aspect_templates=sorted(ASPECT_TEMPLATES),
                dse=man.transform, defaults=dict(aspect_ratio="1:1", cfg=DEFAULT_CFG, tau=DEFAULT_TAU, top_k=0,
                                                 top_p=DEFAULT_TOP_P, ssg_beta=DEFAULT_BETA),
                replicas=opts.replicas, max_batch_wait_ms=opts.max_batch_wait_ms, max_queue=opts.max_queue,
                cache_key=man.data.get("cache_key"))


def schedule_groups(reqs: Sequence[PromptRequest]) -> List[List[int]]:
    """Indices of `reqs` grouped by aspect template (one scale schedule per pipeline run), in
    the order each template first arrived."""
    groups: Dict[float, List[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault(r.template, []).append(i)
    return list(groups.values())


def prompt_note(req: PromptRequest, info, sched, source: str) -> str:
    """The PNG note of one prompt request."""
    r = req.row
    neg = f" negative={req.negative_prompt!r}" if req.negative_prompt is not None else ""
    return (f"{info.cfg.name} backend={info.name} prompt={req.prompt!r} seed={r.seed} aspect={req.aspect_ratio} "
            f"(template {sched.template}) cfg={r.cfg} tau={r.tau} top_k={r.top_k} top_p={r.top_p} ssg={r.ssg_beta} "
            f"dse={info.transform}{neg}; {source}")


class InfinityReplica:
    """What a Generator replica holds for Infinity artifacts: the pipeline and the eager T5."""

    def __init__(self, opts: ServeOptions):
        from var_ssg.graphs.infinity_text import load_t5
        from var_ssg.runtime.infinity import open_infinity
        self.pipe, self.source = open_infinity(artifacts=opts.artifacts, backend=opts.backend, device=opts.device,
                                               threads=opts.threads, verify="stamp")
        self.tok, self.enc = load_t5(opts.text_encoder)
        self.B = self.pipe.info.batch

    def _encode(self, texts: List[str]):
        from var_ssg.graphs.infinity_text import encode_prompts
        e, m = encode_prompts(texts, self.tok, self.enc, self.pipe.info.cfg.text_maxlen)
        return e.numpy(), m.numpy()

    def run(self, reqs: Sequence[PromptRequest]):
        """One pipeline run for requests of one aspect template -> (images n 3 H W, schedule)."""
        (template,) = {r.template for r in reqs}
        emb, mask = self._encode([r.prompt for r in reqs])
        negs = [i for i, r in enumerate(reqs) if r.negative_prompt is not None]
        nemb = nmask = None
        if negs:
            nemb, nmask = self._encode([reqs[i].negative_prompt for i in negs])
        rows = []
        for i, r in enumerate(reqs):
            j = negs.index(i) if i in negs else None
            rows.append(replace(r.row, text=emb[i], mask=mask[i], neg_text=None if j is None else nemb[j],
                                neg_mask=None if j is None else nmask[j]))
        res = self.pipe.run(rows, template)
        return res.images, res.schedule
