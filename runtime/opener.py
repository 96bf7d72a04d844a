"""The one pipeline opener: artifacts (any backend) or a preset's weights (eager), checked the
same way for every command (generate, sample, sweep, spectrum) and every evaluation worker.

    PipelineSource  what to open: --artifacts DIR (onnxruntime by default) or --model PRESET with
                    --ckpt/--vae-ckpt/--random-init (eager); the DSE transforms wanted; the device
    open_pipelines  → ([Pipeline per transform], a note on the weights)
    open_artifacts  → (Manifest, backend) of one artifacts directory (also the server's replicas)
    open_sources    several sources at once (one artifacts directory per transform)

Artifacts bake one DSE transform; the eager backend over --model builds any, which is how a
sweep compares dct with dft without re-exporting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

from var_ssg.graphs.config import get_preset, topk_bake
from var_ssg.common.errors import ConfigError

if TYPE_CHECKING:
    from .pipeline import Pipeline


@dataclass(frozen=True)
class PipelineSource:
    artifacts: Optional[str] = None
    backend: Optional[str] = None            # None: onnxruntime with artifacts, eager without
    model: Optional[str] = None
    ckpt: Optional[str] = None
    vae_ckpt: Optional[str] = None
    random_init: Optional[int] = None
    transforms: Tuple[str, ...] = ()         # () : what the artifacts bake, else dct
    top_k: Optional[int] = None              # the eager backend's baked top-k follows the request
    device: str = "cpu"
    threads: int = 0                         # CPU threads for this pipeline (0: the library's default)
    verify: str = "stamp"                    # artifacts: "stamp" (hash only what the verified stamp does
                                             # not vouch for) or "full" (DESIGN.md "Start-up")
    session_cache: bool = False              # onnxruntime on the CPU: the saved optimised step session
    precision: Optional[str] = None          # eager over --model: graphs.config.RUN_PRECISIONS (None: fp32);
                                             # artifacts carry their own

    @property
    def backend_name(self) -> str:
        return self.backend or ("onnxruntime" if self.artifacts else "eager")


def check_session_cache(backend: str, device: str) -> None:
    """--session-cache keeps ONNX Runtime's CPU session: refused for anything else."""
    if backend != "onnxruntime" or device != "cpu":
        raise ConfigError(f"--session-cache keeps ONNX Runtime's CPU session: it needs --backend onnxruntime "
                          f"--device cpu, not {backend} on {device}")


def open_pipelines(src: PipelineSource) -> Tuple[List[Pipeline], str]:
    """One Pipeline per DSE transform in `src.transforms` (one when none is named), and a note
    on the weights (for outputs' metadata)."""
    backend = src.backend_name
    if src.session_cache:
        check_session_cache(backend, src.device)
    if src.threads and backend == "eager":      # ONNX Runtime takes its own (its sessions' options)
        import torch
        torch.set_num_threads(src.threads)
    if src.precision is not None and src.artifacts:
        raise ConfigError(f"--precision {src.precision}: the artifacts in {src.artifacts} fix the precision "
                          f"(scripts/export.py --precision); drop --precision, or use --model for the eager backend")
    if src.artifacts:
        _, b = open_artifacts(src.artifacts, backend, device=src.device, threads=src.threads, verify=src.verify,
                              session_cache=src.session_cache)
        if src.model and src.model != b.info.cfg.name:
            raise ConfigError(f"--model {src.model} but the artifacts in {src.artifacts} are {b.info.cfg.name}")
        bad = [t for t in src.transforms if t != b.info.transform]
        if bad:
            raise ConfigError(f"--dse {bad[0]} but {src.artifacts} bakes DSE transform {b.info.transform}: "
                              f"give artifacts exported with --dse {bad[0]} (or use --model with the eager backend)")
        from .pipeline import Pipeline
        return [Pipeline(b)], b.source_note
    if backend != "eager":
        raise ConfigError(f"--backend {backend} needs --artifacts DIR (run scripts/export.py first)")
    if not src.model:
        raise ConfigError("give --model (e.g. var-d16) or --artifacts DIR")
    if src.model.startswith("infinity-"):
        raise ConfigError(f"--model {src.model}: this command runs VAR; Infinity runs through scripts/generate.py "
                          f"--prompt and scripts/parity.py")
    cfg = get_preset(src.model)
    from var_ssg.graphs.weights import load_models
    from .backends.eager import EagerBackend
    from .pipeline import Pipeline
    kw = EagerBackend.run_precision(src.precision or "fp32")          # refused before the weights load
    var, vae, weights = load_models(cfg, src.ckpt, src.vae_ckpt, src.random_init)
    note = weights.describe()
    pipes = [Pipeline(EagerBackend(var, vae, transform=t, k_max=topk_bake(src.top_k, cfg.V), device=src.device,
                                   source_note=note, **kw)) for t in (src.transforms or ("dct",))]
    return pipes, note


def open_artifacts(artifacts: str, backend: str, device: str = "cpu", threads: int = 0, verify: str = "stamp",
                   clock: Optional[Callable[[str], None]] = None, session_cache: bool = False):
    """(Manifest, backend) of an artifacts directory. ONNX Runtime builds its sessions as soon
    as the files are verified, before the schema check (DESIGN.md, "Start-up: what runs when"). `clock(stage)` is called when the files are verified ("files") and when the
    manifest is loaded ("manifest"), for start-up reports."""
    from var_ssg.contract.manifest import load_manifest
    from .backends import open_backend
    if session_cache:
        check_session_cache(backend, device)
    kw, early = {}, {}
    hook = None
    if backend == "onnxruntime":
        from .backends.ort import early_sessions
        kw = dict({"threads": threads} if threads else {}, **({"session_cache": True} if session_cache else {}))
        hook = early_sessions(early, device=device, **kw)
    def on_files(man):
        if clock:
            clock("files")
        if hook:
            hook(man)
    man = load_manifest(artifacts, verify=verify, on_files=on_files)
    if clock:
        clock("manifest")
    if early:
        kw["sessions"] = early["sessions"]
    return man, open_backend(backend, man, device=device, **kw)


def open_sources(sources: Sequence[PipelineSource]) -> Tuple[List[Pipeline], str]:
    """The pipelines of several sources (a sweep over one artifacts directory per transform);
    no two may bake the same DSE transform."""
    pipes, note = [], ""
    for src in sources:
        p, note = open_pipelines(src)
        pipes.extend(p)
    have = [p.info.transform for p in pipes]
    if len(set(have)) != len(have):
        raise ConfigError(f"--artifacts {','.join(s.artifacts or '' for s in sources)}: two directories bake "
                          f"the same DSE transform ({have})")
    return pipes, note
