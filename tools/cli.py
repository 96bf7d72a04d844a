"""The CLI layer's shared pieces: flags every command shares, one error policy (user errors
(ConfigError) and environment errors (OSError: disk full, permissions, a name too long;
MemoryError) print one line and exit 2, control characters escaped and long values cut
(common.text.one_line); only a real bug shows a traceback), and the dispatch
from `scripts/NAME.py` and the `var-ssg NAME` console command to `tools.commands.NAME.main`.

Only this layer (tools/) imports argparse; below it everything takes config dataclasses.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import math
import os
import re
import sys
from typing import Callable, List, Optional

from var_ssg.common.text import one_line, shown
from var_ssg.graphs.config import (DEFAULT_GUIDANCE, DEFAULT_SSG_BETA, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P,
                           DSE_TRANSFORMS, GUIDANCE_MAX, RUN_PRECISIONS, SEED_MAX)
from var_ssg.common.errors import ConfigError


def add_model_args(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=model_required, help="preset, e.g. var-d16, var-d24, var-d2-tiny")
    g.add_argument("--ckpt", help="VAR checkpoint (.pth or .safetensors, official format)")
    g.add_argument("--vae-ckpt", help="VQVAE checkpoint (vae_ch160v4096z32.pth)")
    g.add_argument("--random-init", type=seed_int, metavar="SEED", help="seeded random weights (no checkpoint)")


def add_precision_arg(g) -> None:
    """--precision of the eager backend over --model (artifacts carry their own)."""
    g.add_argument("--precision", choices=RUN_PRECISIONS, default=None,
                   help="eager backend over --model: fp32 (default, the reference); bf16 (weights cast, oneDNN "
                        "bf16 GEMMs on AVX512-BF16/AMX CPUs; the decoder under bf16 autocast); bf16-autocast (fp32 "
                        "weights under torch.autocast, as the official code is run); fp16 (GPUs). Artifacts fix "
                        'their own precision (export.py --precision; README "Low precision")')


def note_random_weights(source: str, doing: str = "made with", file=None) -> None:
    """The reminder after a command whose outputs come from random weights (source: the weights
    note; graphs.source words both)."""
    from var_ssg.graphs.source import RANDOM_HINT, is_random_note
    if is_random_note(source):
        print(f"note: {doing} {RANDOM_HINT}", file=file or sys.stderr, flush=True)


def add_session_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--session-cache", action="store_true",
                   help="onnxruntime on the CPU: keep ONNX Runtime's optimised step graph with its pre-packed "
                        "weights in the user's cache (about 2x the weights on disk, once per artifacts "
                        'directory) so later starts load it instead of building it (DESIGN.md "Start-up")')


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not finite")
    return v


def seed_int(s: str) -> int:
    """A seed: 0..2**63-1, refused here with the flag's name (runtime/noise.py takes 0..2**64-1 and the Gumbel stream adds 2**63)."""
    if len(s) > 40:                     # int() of 10,000 digits is slow, and no seed is that long
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{SEED_MAX}, got {shown(s, 40)}")
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(s)} is not an integer") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{SEED_MAX}, got {s}")
    return v


def guidance_float(s: str) -> float:
    v = finite_float(s)
    if abs(v) > GUIDANCE_MAX:
        raise argparse.ArgumentTypeError(f"must be within -{GUIDANCE_MAX:g}..{GUIDANCE_MAX:g} (larger weights "
                                         f"overflow float32 logits), got {s}")
    return v


def add_sampling_args(p: argparse.ArgumentParser, dse_list: bool = False) -> None:
    """dse_list: --dse takes a comma list of transforms (a sweep), not one."""
    g = p.add_argument_group("sampling and guidance")
    g.add_argument("--class", dest="classes", type=int, nargs="+", default=[207], metavar="ID",
                   help="ImageNet class ids 0..999, -1 = unconditional (several make a grid)")
    g.add_argument("--seed", type=seed_int, default=0, help="0..2**63-1")
    g.add_argument("--cfg", dest="guidance", type=guidance_float, default=DEFAULT_GUIDANCE,
                   help="classifier-free guidance (ramped k/(K-1))")
    g.add_argument("--top-k", type=int, default=None,
                   help=f"0 = no top-k (default: {DEFAULT_TOP_K}, or the top-k the artifacts bake if smaller)")
    g.add_argument("--top-p", type=finite_float, default=DEFAULT_TOP_P, help="0 = off")
    g.add_argument("--temperature", type=finite_float, default=DEFAULT_TEMPERATURE)
    g.add_argument("--ssg-beta", default=DEFAULT_SSG_BETA,
                   help="'0' off, a float, 'linear:START,END', or K-1 comma-separated values "
                        f"(default {DEFAULT_SSG_BETA}: ours, the paper publishes none)")
    if dse_list:
        g.add_argument("--dse", default=None, help="comma list of DSE transforms, e.g. dct,dft "
                                                   "(default: dct, or what the --artifacts bake)")
    else:
        g.add_argument("--dse", choices=DSE_TRANSFORMS, default=None,
                       help="DSE transform (default: the one the artifacts bake, else dct)")
    g.add_argument("--more-smooth", action="store_true",
                   help="the official Gumbel-softmax f_hat update (smoother images, not for FID)")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # "-inf", "-nan", "-1e5" are values, not flags: the flag's type then says what is wrong
        # with them (argparse alone answers "expected one argument")
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message):   # one line, exit 2 (argparse's own code); values escaped and cut
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def parser(description: str) -> argparse.ArgumentParser:
    return _Parser(description=description)


def run_main(main: Callable[[], int], own_process: bool = False) -> None:
    """Run `main` under the error policy. `own_process`: this interpreter was started for this
    one command, which skips the interpreter's teardown after a success (`_leave`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        rc = main()
    except ConfigError as e:
        _fail(str(e))
    except OSError as e:        # the machine, not the code: disk full, permissions, name too long, ...
        _fail(describe_os_error(e))
    except MemoryError:
        _fail(OUT_OF_MEMORY)
    except RuntimeError as e:   # torch reports a failed allocation as RuntimeError (CPU) / OutOfMemoryError (CUDA)
        if type(e).__name__ != "OutOfMemoryError" and "can't allocate memory" not in str(e):
            raise
        _fail(OUT_OF_MEMORY)
    except KeyboardInterrupt:
        sys.exit(130)
    if own_process and not rc:
        _leave()
    sys.exit(rc or 0)


def _leave() -> None:
    """Exit 0 now, without the interpreter's teardown: unloading torch and ONNX Runtime's
    sessions costs ~0.9 s after the image is written (DESIGN.md "Start-up"). Only for commands
    in ONE_SHOT, whose outputs are written and renamed before main returns and which start no
    Ray; the streams and the logs are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


OUT_OF_MEMORY = "out of memory (use a smaller --batch or model, or a machine with more memory)"


def describe_os_error(e: OSError) -> str:
    what = e.strerror or errno.errorcode.get(e.errno or 0, "") or str(e) or type(e).__name__
    names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
    return f"{what}: {names}" if names else what


def _fail(msg: str):
    print(f"error: {one_line(msg)}", file=sys.stderr)     # a value never forges a second line
    sys.exit(2)


# --------------------------------------------------------------------------- dispatch
COMMANDS = ("export", "generate", "parity", "lint", "bench", "gpu_check", "sample", "evaluate", "sweep",
            "spectrum", "serve", "bench_serve")
ONE_SHOT = ("generate",)        # skip the interpreter's teardown when run as their own process (_leave)


def _started_for(entry: str) -> bool:
    """True when this interpreter was started to run `entry` (python scripts/NAME.py, var-ssg),
    False when a caller runs the command inside its own process (runpy, a test)."""
    return entry in getattr(sys, "orig_argv", ())[1:]


def script_main(script: str) -> None:
    """`scripts/NAME.py`: run tools.commands.NAME.main with the one error policy."""
    name = os.path.splitext(os.path.basename(script))[0]
    cmd = importlib.import_module(f"var_ssg.tools.commands.{name}")
    run_main(lambda: cmd.main(sys.argv[1:]), own_process=name in ONE_SHOT and _started_for(sys.argv[0]))


def console(argv: Optional[List[str]] = None) -> None:
    """`var-ssg NAME ARGS...` (the console entry point): the same commands as scripts/."""
    own = argv is None and _started_for(sys.argv[0])      # the console command itself, not a caller
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: var-ssg {{{','.join(COMMANDS)}}} [args...]  (var-ssg NAME --help for each)",
              file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    cmd = importlib.import_module(f"var_ssg.tools.commands.{argv[0]}")
    sys.argv[0] = f"var-ssg {argv[0]}"
    run_main(lambda: cmd.main(argv[1:]), own_process=own and argv[0] in ONE_SHOT)
