"""The decoder's export in a process of its own, beside the step's (DESIGN.md, "Export cost").

The export is Python (tracing, decompositions, the ONNX optimiser) and holds the GIL, so a
second thread gains nothing; a second process uses the second core. The parent hands over
what the decoder needs (the VQVAE's configuration and weights, the batch, the opset) in a
scratch directory, and reads back the exported graph with its weights; it writes the
decoder into the artifacts itself, into the shared weights file, so the artifacts are what
an in-process export writes, byte for byte.

    parent                                 child (python -m export.decoder_job SCRATCH PID)
      DecoderJob.start(): job.pkl, vae.pt  ->  load the VQVAE, export, optimise
      ... the step graph is exported ...       -> decoder.onnx (scratch)
      DecoderJob.result(): the ir.Model    <-  exit 0, or exit 1 with the error's last line
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch

from graphs.config import VARConfig

JOB, VAE, OUT, ERR = "job.pkl", "vae.pt", "decoder.onnx", "error.txt"


@dataclass(frozen=True)
class DecoderSpec:
    cfg: VARConfig
    batch: int
    opset: int


def _root() -> str:
    """The folder that holds the `export` package (the child imports it from there)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DecoderJob:
    """The decoder exported by a child process into `scratch` (a folder the caller owns and
    removes). `result()` waits for it and returns the graph; `close()` stops it (always call
    it, e.g. in a finally: nothing is left running or writing)."""

    def __init__(self, vae: torch.nn.Module, spec: DecoderSpec, scratch: str):
        self.scratch = scratch
        with open(os.path.join(scratch, JOB), "wb") as f:
            pickle.dump(spec, f)
        torch.save(vae.state_dict(), os.path.join(scratch, VAE))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_root(), os.environ.get("PYTHONPATH")) if p))
        self._proc: Optional[subprocess.Popen] = subprocess.Popen(
            [sys.executable, "-m", "export.decoder_job", scratch, str(os.getpid())], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def result(self):
        """The exported decoder (an onnx_ir Model, weights in memory)."""
        import onnx_ir as ir
        rc = self._proc.wait()
        self._proc = None
        if rc != 0:
            try:
                with open(os.path.join(self.scratch, ERR)) as f:
                    why = f.read().strip() or f"exit status {rc}"
            except OSError:
                why = f"it ended with exit status {rc} and no message (killed, or out of memory?)"
            raise RuntimeError(f"the decoder's export (a child process) failed: {why}")
        return ir.load(os.path.join(self.scratch, OUT))

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None


def _run(scratch: str) -> None:
    import onnx_ir as ir
    from graphs.components import DecoderComponent
    from graphs.vqvae import VQVAE
    from .onnx_export import export_one
    with open(os.path.join(scratch, JOB), "rb") as f:
        spec: DecoderSpec = pickle.load(f)      # written by the parent, in a folder only it made
    torch.set_num_threads(1)                    # the other core is the step export's
    with torch.device("meta"):
        vae = VQVAE(spec.cfg.vae)
    vae.load_state_dict(torch.load(os.path.join(scratch, VAE), weights_only=True, mmap=True), assign=True)
    dec = DecoderComponent(spec.cfg, spec.batch)
    model = export_one(dec.module(None, vae.eval().requires_grad_(False)).eval(), dec.example_feeds(), dec.inputs,
                       dec.outputs, spec.opset)
    tmp = os.path.join(scratch, ".tmp-" + OUT)
    ir.save(model, tmp)                         # weights inline (the VQVAE decoder is far below 2 GB)
    os.replace(tmp, os.path.join(scratch, OUT))


def _die_with(parent: int) -> None:
    """Leave at once when the parent is gone (killed: its finally never ran), so no orphan keeps
    writing into a folder that the next export cleans up."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)
    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    scratch, parent = (argv or sys.argv[1:])
    _die_with(int(parent))
    try:
        _run(scratch)
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        first = (str(e).strip().splitlines() or [""])[0][:500]
        with open(os.path.join(scratch, ERR), "w") as f:
            f.write(f"{type(e).__name__}: {first}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
