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
      DecoderJob.result(): the ir.Model    <-  exit 0, or exit 1 with the error (error.txt)
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch

from var_ssg.common.checkout import import_root
from var_ssg.graphs.config import VARConfig, VQVAEConfig

JOB, VAE, OUT, ERR, STDERR = "job.pkl", "vae.pt", "decoder.onnx", "error.txt", "stderr.txt"
MESSAGE_CHARS = 3000                    # the most of the child's error the parent quotes


@dataclass(frozen=True)
class DecoderSpec:
    cfg: VARConfig          # the step's configuration (the decoder's input shape)
    vae: VQVAEConfig        # the VQVAE's own, as the parent built it
    batch: int
    opset: int


def _root() -> str:
    """The folder the child imports var_ssg from: the same as this process's."""
    return import_root()


def _tail(path: str, chars: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:].strip()
    except OSError:
        return ""


class DecoderJob:
    """The decoder exported by a child process into `scratch` (a folder the caller owns and
    removes). `start()` hands the VQVAE over and starts it; `result()` waits for it and returns
    the graph; `close()` stops it (always call it, e.g. in a finally, once the job exists:
    nothing is left running or writing)."""

    def __init__(self, vae: torch.nn.Module, spec: DecoderSpec, scratch: str):
        self.vae, self.spec, self.scratch = vae, spec, os.path.abspath(scratch)
        self._proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        with open(os.path.join(self.scratch, JOB), "wb") as f:
            pickle.dump(self.spec, f)
        # the whole VQVAE (the encoder too: the exported program's signature lists every
        # parameter, so the graph is the in-process export's byte for byte)
        torch.save(self.vae.state_dict(), os.path.join(self.scratch, VAE))
        # the child imports this checkout's packages: its PYTHONPATH starts here, its working
        # folder is the scratch folder and PYTHONSAFEPATH keeps that folder off sys.path (so a
        # user's `export.py` or another checkout where the export was started is never imported)
        env = dict(os.environ, PYTHONSAFEPATH="1",
                   PYTHONPATH=os.pathsep.join(p for p in (_root(), os.environ.get("PYTHONPATH")) if p))
        with open(os.path.join(self.scratch, STDERR), "wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "var_ssg.export.decoder_job", self.scratch, str(os.getpid())], env=env,
                cwd=self.scratch, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def result(self):
        """The exported decoder (an onnx_ir Model, weights in memory)."""
        import onnx_ir as ir
        rc = self._proc.wait()
        self._proc = None
        if rc != 0:
            why = _tail(os.path.join(self.scratch, ERR), MESSAGE_CHARS)
            if not why:             # it died before it could say why: an import error, a crash, a signal
                how = f"exit status {rc}"
                if rc < 0:
                    how = f"signal {signal.Signals(-rc).name}" + (" (killed: out of memory?)" if rc == -9 else "")
                last = _tail(os.path.join(self.scratch, STDERR), MESSAGE_CHARS)
                why = f"it ended with {how}" + (f"; its last output:\n{last}" if last else " and no output")
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
    from var_ssg.graphs.components import DecoderComponent
    from var_ssg.graphs.vqvae import VQVAE
    from .dynamo import export_one
    with open(os.path.join(scratch, JOB), "rb") as f:
        spec: DecoderSpec = pickle.load(f)      # written by the parent, in a folder only it made
    torch.set_num_threads(1)                    # the other core is the step export's
    with torch.device("meta"):
        vae = VQVAE(spec.vae)
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
        traceback.print_exc()                   # into stderr.txt, for whoever debugs it
        with open(os.path.join(scratch, ERR), "w") as f:
            f.write(f"{type(e).__name__}: {str(e).strip()}"[:MESSAGE_CHARS])
        return 1


if __name__ == "__main__":
    sys.exit(main())
