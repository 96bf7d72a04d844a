"""Shared command-line pieces for scripts/: flags every backend shares, and one error policy
(a user error prints one line and exits 2; nothing half-written is left behind).

Every script imports this module first. Python puts the running script's folder first on
sys.path, where scripts/export.py would shadow the `export` package for every later import;
the packages come from the installation, so that folder is taken off the path here.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Callable

_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _SCRIPTS]

from graphs.config import DEFAULT_SSG_BETA, ConfigError


def add_model_args(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=model_required, help="preset, e.g. var-d16, var-d24, var-d2-tiny")
    g.add_argument("--ckpt", help="VAR checkpoint (.pth or .safetensors, official format)")
    g.add_argument("--vae-ckpt", help="VQVAE checkpoint (vae_ch160v4096z32.pth)")
    g.add_argument("--random-init", type=int, metavar="SEED", help="seeded random weights (no checkpoint)")


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not finite")
    return v


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling and guidance")
    g.add_argument("--class", dest="classes", type=int, nargs="+", default=[207], metavar="ID",
                   help="ImageNet class ids 0..999, -1 = unconditional (several make a grid)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cfg", dest="guidance", type=finite_float, default=1.5, help="classifier-free guidance (ramped k/(K-1))")
    g.add_argument("--top-k", type=int, default=900, help="0 = no top-k")
    g.add_argument("--top-p", type=float, default=0.96, help="0 = off")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--ssg-beta", default=DEFAULT_SSG_BETA,
                   help="'0' off, a float, 'linear:START,END', or K-1 comma-separated values "
                        f"(default {DEFAULT_SSG_BETA}: ours, the paper publishes none)")
    g.add_argument("--dse", choices=("dct", "dft"), default="dct", help="DSE transform")
    g.add_argument("--more-smooth", action="store_true",
                   help="the official Gumbel-softmax f_hat update (smoother images, not for FID)")


def check_output_path(path: str, ext: str) -> None:
    """Refuse an output path before any work: wrong extension, a directory, no writable folder."""
    if not str(path).lower().endswith(ext):
        raise ConfigError(f"{path}: the output must be a {ext} file")
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory; give a file name ending in {ext}")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise ConfigError(f"cannot write {path}: folder {d} does not exist or is not writable")


def write_atomic(path: str, text: str) -> None:
    """Write to a temporary name beside `path`, then rename: never a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit 2 (argparse's own code)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser(description: str) -> argparse.ArgumentParser:
    return _Parser(description=description)


def run_main(main: Callable[[], int]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        rc = main()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rc or 0)
