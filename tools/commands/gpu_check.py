"""`scripts/gpu_check.py`: The GPU check (run by scripts/gpu_check.sh): what a borrowed GPU can actually run, as one
markdown table printed row by row (a row the moment it is measured, a skipped row with its
reason, a `summary:` line last), for var-d16 and var-d24 with random weights. No network.

Rows, in the order the budget is spent on them:
  1. eager PyTorch fp32 / fp16 / bf16 at batch 1 and 8: latency per image, ratio to eager fp32,
     distance from the roofline floor (tools/roofline.py, data-sheet peaks), and parity against
     eager fp32 with the same noise: share of equal tokens, the first scale whose tokens differ,
     and per scale max|d logits| / max|ref|, checked against SPEC section 6's bound up to and
     including that scale (past it the two runs sample different token paths, so their logits
     are no longer comparable). The strict, teacher-forced rule is runtime/parity.py's.
  2. ONNX Runtime's CUDA provider and TensorRT (fp32, batch 1, --exported models), only where
     their packages exist: the backends are chosen before anything is exported, and nothing
     is exported when none of them can run.
Budget: a stage starts only when its estimate (a guess until something was measured, then
scaled from measurements) fits what is left; repeats stop early when time runs short; SIGTERM
(gpu_check.sh's `timeout`) ends the table with the summary line.

  bash scripts/gpu_check.sh                                   (on the GPU machine; < 6 min)
  python3 scripts/gpu_check.py --device cpu --models var-d2-tiny --exported var-d2-tiny --top-k 64
"""
from __future__ import annotations

import logging
import os
import signal
import statistics
import time

from tools.cli import parser
from graphs.config import ConfigError, SamplerConfig, get_preset, make_ssg, topk_bake

CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)        # batch b uses the first b
BOUNDS = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 3e-2}      # logits max|d|/max|ref|, SPEC section 6
# Guesses (seconds) used until this run has measured something; never measured on a GPU yet.
BUILD_S_PER_GPARAM = 30       # random weights on the host (var-d24: ~1 G parameters)
RUN_S_PER_GPARAM = 3.0        # one batch-1 eager run, first one (CUDA start-up) included
EXPORT_S_PER_GPARAM = 200     # ONNX export + checker + lint + hashes (var-d16: 29 s on 2 CPU cores here)
TRT_BUILD_S_PER_GPARAM = 800  # step engine (10 profiles) + decoder


class Stopped(Exception):
    """SIGTERM (the shell's timeout): finish the table with what was measured."""


def _on_term(signum, frame):
    raise Stopped()


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, time.monotonic()

    def used(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.used()

    def short(self, estimate: float):
        """None if `estimate` seconds fit, else the reason to skip."""
        return None if estimate <= self.left() else f"budget: needs ~{estimate:.0f} s, {max(self.left(), 0):.0f} s left"


class Table:
    COLS = ("model", "backend", "precision", "batch", "ms / image", "vs eager fp32", "x roofline floor",
            "tokens = fp32", "first token diff", "logits rel err, k = 0..K-1", "within bound", "note")

    def __init__(self):
        self.measured = self.skipped = self.failed = 0
        print("| " + " | ".join(self.COLS) + " |")
        print("|" + "---|" * len(self.COLS), flush=True)

    def _print(self, cells):
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)

    def row(self, key, cells, note=""):
        self.measured += 1
        self._print(list(key) + list(cells) + [note])

    def skip(self, key, why: str, failed: bool = False):
        if failed:
            self.failed += 1
        else:
            self.skipped += 1
        self._print(list(key) + ["-"] * (len(self.COLS) - 5) + [("FAILED: " if failed else "skipped: ") + why])


def probe(device: str) -> dict:
    """What this machine can run: CUDA, the GPU, onnxruntime's providers, tensorrt."""
    import torch
    env = dict(cuda=torch.cuda.is_available(), gpu="cpu", ort=None, providers=[], trt=None)
    if device == "cuda" and env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime as ort
        env["ort"], env["providers"] = ort.__version__, ort.get_available_providers()
    except ImportError:
        pass
    try:
        import tensorrt
        env["trt"] = tensorrt.__version__
    except ImportError:
        pass
    return env


def choose_exported(device: str, env: dict):
    """([exported backends this machine can run], {backend: why not}), before anything is exported."""
    ok, why = [], {}
    no_gpu = device == "cuda" and not env["cuda"]
    if env["ort"] is None:
        why["onnxruntime"] = "onnxruntime is not installed"
    elif device == "cuda" and "CUDAExecutionProvider" not in env["providers"]:
        why["onnxruntime"] = (f"onnxruntime {env['ort']} has no CUDAExecutionProvider (a CPU build; "
                              f"onnxruntime-gpu is not installed)")
    elif no_gpu:
        why["onnxruntime"] = "no CUDA device visible to PyTorch"
    else:
        ok.append("onnxruntime")
    if env["trt"] is None:
        why["tensorrt"] = "tensorrt is not installed"
    elif device != "cuda" or no_gpu:
        why["tensorrt"] = "needs a CUDA GPU"
    else:
        ok.append("tensorrt")
    if no_gpu:
        why = {b: w if w.startswith("no CUDA") else f"no CUDA device visible to PyTorch; {w}" for b, w in why.items()}
    return ok, why


def parity(ref, got, precision: str):
    """(share of equal tokens, first scale with a differing token or None, per-scale logits
    max|d|/max|ref|, all within SPEC's bound up to and including that scale)."""
    eq = tot = 0
    first = None
    rel = []
    for k, (a, b, la, lb) in enumerate(zip(ref.tokens, got.tokens, ref.logits, got.logits)):
        same = int((a == b.cpu()).sum())
        eq, tot = eq + same, tot + a.numel()
        if first is None and same != a.numel():
            first = k
        lb = lb.float().cpu()
        rel.append(float((la - lb).abs().max() / la.abs().max().clamp_min(1e-30)))
    upto = len(rel) if first is None else first + 1
    return eq / tot, first, rel, all(r <= BOUNDS[precision] for r in rel[:upto])


def floor_seconds(cfg, batch: int, precision: str, gpu: str):
    from tools.roofline import floor, gpu_peaks
    peaks = gpu_peaks(gpu)
    if not peaks:
        return None
    key = "fp32" if precision == "fp32" else "fp16"
    return floor(cfg, batch, peaks[key], peaks["bandwidth"], 4 if precision == "fp32" else 2).seconds


def main(argv=None) -> int:
    p = parser("GPU check: eager CUDA fp32/fp16/bf16, and ONNX Runtime CUDA / TensorRT where installed; one table.")
    p.add_argument("--models", default="var-d16,var-d24")
    p.add_argument("--precisions", default="fp32,fp16,bf16", help="eager precisions (fp32 first: the reference)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (after 2 warm-ups), fewer when short of time")
    p.add_argument("--budget", type=float, default=320, help="seconds; a stage whose estimate does not fit is skipped")
    p.add_argument("--exported", default="var-d16", help="models that also get ONNX Runtime/TensorRT rows (batch 1)")
    p.add_argument("--artifacts-root", default="build/gpu_check")
    p.add_argument("--top-k", type=int, default=900)
    a = p.parse_args(argv)
    budget = Budget(a.budget)
    signal.signal(signal.SIGTERM, _on_term)
    logging.getLogger().setLevel(logging.WARNING)      # keep INFO lines out of the table
    import torch
    env = probe(a.device)
    dev = "cpu" if a.device == "cpu" else env["gpu"] if env["cuda"] else "cuda requested, none visible"
    print(f"device: {dev}; torch {torch.__version__} "
          f"(cuda {torch.version.cuda}, available: {env['cuda']}); onnxruntime {env['ort'] or 'not installed'} "
          f"{env['providers']}; tensorrt {env['trt'] or 'not installed'}; budget {a.budget:.0f} s", flush=True)
    exported_ok, exported_why = choose_exported(a.device, env)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    precs = [x.strip() for x in a.precisions.split(",") if x.strip()]
    batches = [int(x) for x in a.batches.split(",") if x.strip()]
    for prec in precs:
        if prec not in BOUNDS:
            raise ConfigError(f"--precisions: {prec!r} is not one of {', '.join(BOUNDS)}")
    if any(not 1 <= b <= len(CLASSES) for b in batches):
        raise ConfigError(f"--batches must be in 1..{len(CLASSES)}")
    table = Table()
    try:
        for name in models:
            ModelCheck(a, name, budget, env, table).run(precs, batches, exported_ok, exported_why)
        note = ""
    except Stopped:
        note = " stopped by SIGTERM (timeout): the rows above are what was measured;"
    print(f"summary: {table.measured} measured, {table.skipped} skipped, {table.failed} failed;{note} "
          f"{budget.used():.0f} s of a {a.budget:.0f} s budget", flush=True)
    return 1 if table.failed else 0


class ModelCheck:
    """The rows of one model: eager precisions x batches, then the exported backends."""

    def __init__(self, a, name, budget, env, table):
        import torch
        from tools.roofline import transformer_bytes
        self.a, self.budget, self.env, self.table, self.torch = a, budget, env, table, torch
        self.cfg = get_preset(name)
        self.gparams = transformer_bytes(self.cfg, 1) / 1e9
        self.k_max = topk_bake(a.top_k, self.cfg.V)        # the sampler K an export bakes too
        self.sampler = SamplerConfig(top_k=min(a.top_k, self.k_max) if self.k_max else 0, top_p=0.96)
        self.ssg = make_ssg("linear:0.1,0.3", "dct")
        self.ref, self.base = {}, {}                       # batch -> eager fp32 result / seconds per batch
        self.run_s = {}                                    # batch -> seconds of one run, last measured

    def sync(self):
        if self.a.device == "cuda":
            self.torch.cuda.synchronize()

    def run_estimate(self, batch: int) -> float:
        if batch in self.run_s:
            return self.run_s[batch]
        if self.run_s:                                     # linear in batch: an upper bound on a GPU
            b0 = max(self.run_s)
            return self.run_s[b0] * batch / b0
        return RUN_S_PER_GPARAM * self.gparams * batch

    def measure(self, pipe, batch: int):
        """2 warm-ups (TensorRT captures its CUDA graphs on the 2nd), then up to --repeats timed
        runs while the budget lasts. Returns (seconds per batch, the first run's result, runs)."""
        classes = list(CLASSES[:batch])
        res = pipe.run(classes, 0, guidance=1.5, sampler=self.sampler, ssg=self.ssg, keep_logits=True)
        self.sync()
        res.tokens = [x.cpu() for x in res.tokens]
        res.logits, res.logits_cfg = [x.float().cpu() for x in res.logits], []
        ts = []
        for r in range(self.a.repeats + 1):
            if r > 1 and self.budget.left() < 2 * max(ts):
                break
            t = time.perf_counter()
            pipe.run(classes, r + 1, guidance=1.5, sampler=self.sampler, ssg=self.ssg)
            self.sync()
            ts.append(time.perf_counter() - t)
            self.run_s[batch] = ts[-1]
        timed = ts[1:] or ts                               # ts[0] is the second warm-up
        return statistics.median(timed), res, len(ts) - 1

    def report(self, key, sec, res, n, note=""):
        _, backend, prec, batch = key
        fl = floor_seconds(self.cfg, batch, prec, self.env["gpu"]) if self.a.device == "cuda" else None
        cells = [f"{sec / batch * 1000:.1f}", f"{sec / self.base[batch]:.2f}x" if batch in self.base else "-",
                 f"{sec / fl:.1f}x" if fl else "-"]
        if (backend, prec) == ("eager", "fp32"):
            cells += ["reference"] * 4
        elif batch in self.ref:
            agree, first, rel, ok = parity(self.ref[batch], res, prec)
            cells += [f"{agree * 100:.2f}%", "none" if first is None else f"k={first}",
                      " ".join(f"{r:.0e}" for r in rel), f"{'yes' if ok else 'NO'} (<= {BOUNDS[prec]:g})"]
        else:
            cells += ["-"] * 4
        self.table.row(key, cells, (note + "; " if note else "") + (f"median of {n}" if n else "one warm run"))

    def run(self, precs, batches, exported_ok, exported_why):
        a, table, torch = self.a, self.table, self.torch
        keys = [(self.cfg.name, "eager", prec, b) for b in batches for prec in precs]
        want_exported = self.cfg.name in [m.strip() for m in a.exported.split(",")]
        exported = [(self.cfg.name, b, "fp32", 1) for b in ("onnxruntime", "tensorrt")] if want_exported else []
        if a.device == "cuda" and not self.env["cuda"]:
            for key in keys:
                table.skip(key, "no CUDA device visible to PyTorch")
            for key in exported:
                table.skip(key, exported_why[key[1]])
            return
        why = self.budget.short(BUILD_S_PER_GPARAM * self.gparams + self.run_estimate(1) * 4)
        if why:
            for key in keys + exported:
                table.skip(key, f"random weights + first run {why}")
            return
        from graphs.weights import random_models
        from runtime.backends.eager import EagerBackend
        from runtime.pipeline import Pipeline
        self.var, self.vae = random_models(self.cfg, 0)
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        for key in keys:
            _, _, prec, batch = key
            why = self.budget.short(self.run_estimate(batch) * (a.repeats + 2) + 5)
            if why:
                table.skip(key, why)
                continue
            try:
                backend = EagerBackend(self.var, self.vae, transform="dct", k_max=self.k_max, dtype=dtypes[prec],
                                       device=a.device)
                sec, res, n = self.measure(Pipeline(backend), batch)
            except (ConfigError, RuntimeError) as e:
                table.skip(key, f"{type(e).__name__}: {str(e)[:160]}", failed=True)
                continue
            finally:
                backend = None
                if a.device == "cuda":
                    torch.cuda.empty_cache()
            if prec == "fp32":
                self.ref[batch], self.base[batch] = res, sec
            self.report(key, sec, res, n)
        if exported:
            self.exported_rows(exported, exported_ok, exported_why)

    def exported_rows(self, keys, exported_ok, exported_why):
        """ONNX Runtime CUDA / TensorRT rows: export (or reuse) only when one of them can run."""
        a, table, cfg = self.a, self.table, self.cfg
        usable = [k for k in keys if k[1] in exported_ok]
        for key in keys:
            if key[1] not in exported_ok:
                table.skip(key, exported_why[key[1]])
        if not usable:
            return
        from contract.manifest import load_manifest
        from export.onnx_export import ExportConfig, ExportError, cache_key, export_artifacts
        from graphs.weights import WeightSource
        from runtime.backends import open_backend
        from runtime.pipeline import Pipeline
        trt = any(k[1] == "tensorrt" for k in usable)
        ec = ExportConfig(top_k=a.top_k, target="trt" if trt else "onnx")
        out = os.path.join(a.artifacts_root, f"{cfg.name}-b1-fp32")
        try:
            fresh = load_manifest(out, verify_hashes=False).data.get("cache_key") == cache_key(cfg, ec, "random:0")
        except ConfigError:
            fresh = False
        estimate = (0 if fresh else EXPORT_S_PER_GPARAM * self.gparams) + (TRT_BUILD_S_PER_GPARAM * self.gparams
                                                                           if trt else 0)
        why = self.budget.short(estimate + self.run_estimate(1) * (a.repeats + 2) * len(usable))
        if why:
            for key in usable:
                table.skip(key, f"export ({ec.target}) {why}")
            return
        self.var.to("cpu")                                 # the exporter traces on the host
        self.vae.to("cpu")
        t = time.time()
        src = WeightSource(kind="random", seed=0)
        try:
            try:                                           # reused when up to date (graphs' and engines' keys)
                export_artifacts(self.var, self.vae, src, out, ec)
            except ExportError:
                export_artifacts(self.var, self.vae, src, out, ec, force=True)
        except (ConfigError, RuntimeError, OSError) as e:
            for key in usable:
                table.skip(key, f"export ({ec.target}): {type(e).__name__}: {str(e)[:160]}", failed=True)
            return
        export_s = time.time() - t
        for key in usable:
            why = self.budget.short(self.run_estimate(1) * (a.repeats + 2))
            if why:
                table.skip(key, why)
                continue
            try:
                sec, res, n = self.measure(Pipeline(open_backend(key[1], out, device=a.device)), 1)
            except (ConfigError, RuntimeError) as e:
                table.skip(key, f"{type(e).__name__}: {str(e)[:160]}", failed=True)
                continue
            self.report(key, sec, res, n, f"export ({ec.target}) {export_s:.0f} s")

