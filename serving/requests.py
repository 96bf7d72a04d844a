"""One HTTP request → one checked Row, with no Ray import (unit-tested without a server).

Routes: POST /v1/generate {"class": 207, "seed": 0, ["cfg", "ssg_beta", "top_k", "top_p",
"temperature", "more_smooth"]} → 200 image/png; GET /healthz; GET /v1/model. The value checks
are the CLI's (Pipeline.check_row), shared, not rewritten; a user error is RequestError with
the HTTP status (400, 413) and a message that says what to fix.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from var_ssg.common.checkout import import_root
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import BACKENDS

APP = "var-ssg"
FIELDS = ("class", "seed", "cfg", "ssg_beta", "top_k", "top_p", "temperature", "more_smooth")
MAX_BODY = 64 << 10                 # bytes: a request is one small JSON object
MAX_DIGITS = 40                     # an integer longer than this is no id, seed or top-k
ROUTES = "POST /v1/generate, GET /healthz, GET /v1/model"
EXAMPLE = '{"class": 207, "seed": 0}'


@dataclass(frozen=True)
class ServeOptions:
    """Everything a replica needs (pickled into the deployments)."""
    artifacts: str
    backend: str = "onnxruntime"
    device: str = "cpu"
    replicas: Optional[int] = 1       # None: one per GPU with device cuda, else 1
    max_batch_wait_ms: float = 20.0
    max_queue: int = 64
    threads: int = 0                    # per replica: torch and ONNX Runtime intra-op threads (0 = all cores)
    session_cache: bool = False         # onnxruntime on the CPU: the saved optimised step session
    cpus_per_replica: float = 1.0       # what Ray reserves per CPU replica (scheduling only)
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0        # a client must send its whole body within this (else 408)
    drain_s: float = 30.0               # on stop: how long requests in flight may finish (then 503)
    pythonpath: Tuple[str, ...] = field(default_factory=tuple)   # where the replicas import this code from
    text_encoder: Optional[str] = None  # Infinity artifacts: the local T5 folder (tokenizer + encoder)

    def check(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.backend == "tensorrt" and self.device != "cuda":
            raise ConfigError("--backend tensorrt runs on --device cuda")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"--replicas must be >= 1, got {self.replicas}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0 = all cores), got {self.threads}")
        if self.session_cache:
            from var_ssg.runtime.opener import check_session_cache
            check_session_cache(self.backend, self.device)
        for flag, v, hi in (("--max-batch-wait-ms", self.max_batch_wait_ms, 60_000),
                            ("--cpus-per-replica", self.cpus_per_replica, 1024),
                            ("--request-timeout-s", self.request_timeout_s, 86_400),
                            ("--body-timeout-s", self.body_timeout_s, 3600),
                            ("--drain-s", self.drain_s, 3600)):
            zero_ok = flag == "--max-batch-wait-ms"
            if not (math.isfinite(v) and (0 <= v if zero_ok else 0 < v) and v <= hi):
                raise ConfigError(f"{flag} must be a number {'>= 0' if zero_ok else '> 0'} and <= {hi}, got {v}")


def code_path() -> Tuple[str, ...]:
    """This checkout's root first, then the driver's PYTHONPATH: the replicas import the same code."""
    root = import_root()
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return (root, *rest)


class RequestError(Exception):
    """A user error in an HTTP request: `status` and a message that says what to fix."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _LongInt(str):
    """A JSON integer literal too long to be any field's value (parsed as text, not converted:
    Python refuses ints over 4300 digits, and converting long ones costs quadratic time)."""


def _parse_int(s: str):
    return _LongInt(s) if len(s.lstrip("-")) > MAX_DIGITS else int(s)


def _show(v) -> str:
    if isinstance(v, _LongInt):
        return f"an integer of {len(v.lstrip('-'))} digits"
    return json.dumps(v)[:40]


def _int(d: Dict[str, Any], key: str, what: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        kind = "an integer in range" if isinstance(v, _LongInt) else "an integer"
        raise RequestError(f"{key!r} must be {kind} ({what}), got {_show(v)}")
    return v


def _num(d: Dict[str, Any], key: str) -> float:
    v = d[key]
    if isinstance(v, _LongInt):
        raise RequestError(f"{key!r} is too large: {_show(v)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{key!r} must be a number, got {_show(v)}")
    try:
        return float(v)
    except OverflowError:
        raise RequestError(f"{key!r} is too large: {str(v)[:40]}...") from None


def _beta(v) -> Any:
    def number(b):
        return isinstance(b, (int, float)) and not isinstance(b, (bool, _LongInt))
    if isinstance(v, list) and all(number(b) for b in v):
        try:
            return tuple(float(b) for b in v)
        except OverflowError:
            raise RequestError("'ssg_beta' holds a number too large for a float") from None
    if number(v):
        try:
            return repr(float(v))
        except OverflowError:
            raise RequestError("'ssg_beta' is too large for a float") from None
    if isinstance(v, str) and not isinstance(v, _LongInt):
        return v
    raise RequestError(f"'ssg_beta' must be a string like \"linear:0.1,0.3\", a number or a list of numbers, "
                       f"got {_show(v)}")


def parse_request(body: bytes, pipe):
    """JSON body -> a checked Row. Raises RequestError (400/413) with what to fix; the value
    checks are the CLI's (`pipe.check_row`)."""
    from var_ssg.runtime.pipeline import Row
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
        raise RequestError(f"unknown field {unknown[0]!r:.40}; accepted fields: {', '.join(FIELDS)}")
    for key in ("class", "seed"):
        if key not in d:
            raise RequestError(f"missing {key!r}; send at least {EXAMPLE}")
    kw: Dict[str, Any] = dict(class_id=_int(d, "class", "an ImageNet class id, -1 = unconditional"),
                              seed=_int(d, "seed", "0..2**63-1"))
    if "cfg" in d:
        kw["guidance"] = _num(d, "cfg")
    if "ssg_beta" in d:
        kw["ssg_beta"] = _beta(d["ssg_beta"])
    if "top_k" in d:
        kw["top_k"] = _int(d, "top_k", "0 = no top-k")
    for key in ("top_p", "temperature"):
        if key in d:
            kw[key] = _num(d, key)
    if "more_smooth" in d:
        if not isinstance(d["more_smooth"], bool):
            raise RequestError(f"'more_smooth' must be true or false, got {_show(d['more_smooth'])}")
        kw["more_smooth"] = d["more_smooth"]
    try:
        row = Row(**kw)
        pipe.check_row(row)
    except ConfigError as e:
        raise RequestError(str(e)) from None
    return row


def too_large(n: Optional[int]) -> str:
    size = f"of {n} bytes " if n is not None else ""
    return f"request body {size}is over {MAX_BODY} bytes; send one JSON object like {EXAMPLE}"


def row_note(row, info, source: str) -> str:
    """The PNG note of one request (the same function as generate.py's)."""
    from var_ssg.runtime.images import png_note
    return png_note(info.cfg.name, info.name, [row.class_id], row.seed, guidance=row.guidance, ssg=row.ssg_beta,
                    top_k=row.top_k, top_p=row.top_p, temperature=row.temperature, transform=info.transform,
                    more_smooth=row.more_smooth, source=source)


class _InfoOnly:
    """A backend stand-in that only describes the artifacts: requests are validated with
    Pipeline.check_row without loading any weights."""

    def __init__(self, info):
        self.info = info
        self.source_note = ""


def describe(man, backend: str, device: str):
    """The BackendInfo that `backend` on `device` would report for the artifacts `man`."""
    from var_ssg.runtime.backends.base import BackendInfo
    return BackendInfo(name=backend, cfg=man.cfg, k_max=man.k_max, transform=man.transform, kv_dtype=man.kv_dtype,
                       batch=None if backend == "eager" else man.batch, device=device)


def checker(info):
    """A Pipeline that validates rows for `info` (a BackendInfo) and runs nothing."""
    from var_ssg.runtime.pipeline import Pipeline
    return Pipeline(_InfoOnly(info))


def model_summary(man, opts: ServeOptions) -> Dict[str, Any]:
    """GET /v1/model (the replicas' start-up times are added by the Frontend)."""
    from var_ssg.runtime.pipeline import Row
    cfg = man.cfg
    defaults = Row(class_id=0, seed=0)
    return dict(model=cfg.name, precision=man.precision, batch=man.batch, backend=opts.backend, device=opts.device,
                weights=man.weights["kind"], weights_source=man.source_note,
                random_weights=man.weights["kind"] == "random", num_classes=cfg.num_classes,
                image_size=16 * cfg.patch_nums[-1], dse=man.transform, top_k_max=man.k_max,
                defaults=dict(cfg=defaults.guidance, ssg_beta=defaults.ssg_beta, top_k=defaults.top_k,
                              top_p=defaults.top_p, temperature=defaults.temperature,
                              more_smooth=defaults.more_smooth),
                replicas=opts.replicas, max_batch_wait_ms=opts.max_batch_wait_ms, max_queue=opts.max_queue,
                cache_key=man.data.get("cache_key"))


def preflight(opts: ServeOptions):
    """What the driver checks before starting anything: the options, the artifacts (fully
    verified, graphs, weights' values and constants included: the same one-line error as
    generate.py) and that the backend's packages exist."""
    opts.check()
    from var_ssg.contract.artifacts_check import check_artifacts
    from var_ssg.contract.manifest import load_manifest
    man = load_manifest(opts.artifacts, verify="stamp")
    if man.family == "infinity":    # prompts: DESIGN.md "Serving prompts"
        check_text_encoder(opts, man)
    else:
        if opts.text_encoder:
            raise ConfigError(f"--text-encoder is for Infinity artifacts; {opts.artifacts} holds {man.cfg.name} (VAR, "
                              f"class-conditional): drop it")
        check_artifacts(man)        # what a replica checks when it opens them: generate's one line, now
    if opts.backend == "tensorrt":
        from var_ssg.contract.tensorrt import import_tensorrt
        import_tensorrt()
    elif opts.backend == "onnxruntime":
        from var_ssg.runtime.backends.ort import import_ort
        if opts.device == "cuda" and "CUDAExecutionProvider" not in import_ort().get_available_providers():
            raise ConfigError("--device cuda: this onnxruntime has no CUDAExecutionProvider; "
                              "pip install onnxruntime-gpu (and a CUDA 12 runtime)")
    return man


# ---------------------------------------------------------------- Infinity (serving.prompts)
def load_tokenizer(text_encoder: str):
    """The tokenizer of --text-encoder DIR (what the Frontend counts prompt tokens with)."""
    from var_ssg.graphs.infinity_text import _transformers
    tf = _transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(text_encoder)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"--text-encoder {text_encoder}: cannot load its tokenizer: {first}") from None


def check_text_encoder(opts: ServeOptions, man) -> None:
    """Before Ray starts: Infinity artifacts need --text-encoder DIR, a tokenizer that loads and an
    encoder whose width is the model's (read from its config, the weights stay on disk)."""
    cfg = man.cfg
    if not opts.text_encoder:
        raise ConfigError(f"{man.root} holds Infinity artifacts ({cfg.name}): serving prompts needs its T5 text "
                          f"encoder, pass --text-encoder DIR (a local folder with the tokenizer and encoder, "
                          f"{cfg.t5 or 'width ' + str(cfg.text_dim)}); nothing is downloaded")
    if opts.backend not in ("onnxruntime", "eager", "tensorrt"):
        raise ConfigError(f"--backend {opts.backend}: Infinity runs on eager, onnxruntime and tensorrt")
    if opts.backend == "tensorrt" and not man.data.get("engines"):
        raise ConfigError(f"{man.root} has no TensorRT engines (exported without --target trt): re-export with "
                          f"scripts/export.py --model {cfg.name} ... --target trt on the GPU that serves them")
    if opts.backend == "onnxruntime" and opts.device != "cpu":
        raise ConfigError("Infinity on onnxruntime runs on --device cpu here (CUDA is not wired for it yet)")
    if opts.session_cache:
        raise ConfigError("--session-cache is for VAR artifacts on onnxruntime; Infinity does not keep one")
    load_tokenizer(opts.text_encoder)
    from var_ssg.graphs.infinity_text import _transformers
    try:
        width = _transformers().AutoConfig.from_pretrained(opts.text_encoder).d_model
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"--text-encoder {opts.text_encoder}: no T5 encoder config there ({type(e).__name__})") from None
    if width != cfg.text_dim:
        raise ConfigError(f"--text-encoder {opts.text_encoder} gives states of width {width}; {cfg.name} takes "
                          f"{cfg.text_dim} (the encoder it was trained with: {cfg.t5 or 'see its preset'})")
