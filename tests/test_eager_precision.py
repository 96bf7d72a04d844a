"""The eager backend's run precisions over --model (graphs.config.RUN_PRECISIONS; DESIGN.md
"Low precision"): what each computes in, that the opener and the CLI pass it through, and that
artifacts refuse it (they carry their own)."""
import math

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli
from var_ssg.common.errors import ConfigError
from var_ssg.graphs.config import RUN_PRECISIONS, SamplerConfig
from var_ssg.runtime.backends.eager import EagerBackend
from var_ssg.runtime.opener import PipelineSource, open_pipelines


def test_each_run_precision_names_what_it_computes_in():
    assert EagerBackend.run_precision("fp32") == {}
    assert EagerBackend.run_precision("bf16") == dict(dtype=torch.bfloat16, decoder_autocast=torch.bfloat16)
    assert EagerBackend.run_precision("fp16") == dict(dtype=torch.float16, decoder_autocast=torch.float16)
    assert EagerBackend.run_precision("bf16-autocast") == dict(autocast=torch.bfloat16,
                                                               decoder_autocast=torch.bfloat16)
    assert set(RUN_PRECISIONS) == {"fp32", "fp16", "bf16", "bf16-autocast"}
    with pytest.raises(ConfigError, match="--precision 'int8': choose one of fp32, fp16, bf16, bf16-autocast"):
        EagerBackend.run_precision("int8")


def test_artifacts_refuse_a_run_precision(tmp_path):
    """Checked before anything opens: the directory need not exist."""
    with pytest.raises(ConfigError, match="artifacts in .* fix the precision .* drop --precision"):
        open_pipelines(PipelineSource(artifacts=str(tmp_path / "none"), precision="bf16"))


def _psnr(a, b):
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)       # images in [-1, 1]


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_bf16_runs_change_the_numbers_a_little(precision):
    """Through the opener: fp32 and a bf16 precision from the same random weights. The bf16 run's
    transformer weights (bf16) or its autocast region really run in bf16: its logits differ from
    fp32's, by what bf16 rounding gives (relative 1e-4 .. 5e-2); the decoder under bf16 autocast
    returns a float32 image within 30 dB of fp32's on the same f_hat, and not equal to it."""
    src = dict(model=TINY, random_init=0, top_k=20)
    (ref,), _ = open_pipelines(PipelineSource(**src))
    (low,), _ = open_pipelines(PipelineSource(**src, precision=precision))
    sampler = SamplerConfig(top_k=20)
    a = ref.run([3], 0, sampler=sampler, keep_logits=True)
    b = low.run([3], 0, sampler=sampler, keep_logits=True, force_tokens=a.tokens)     # teacher-forced
    for k in (0, len(a.tokens) - 1):
        la, lb = np.asarray(a.logits[k], np.float64), np.asarray(b.logits[k], np.float64)
        rel = np.abs(la - lb).max() / np.abs(la).max()
        assert 1e-4 < rel < 5e-2, (k, rel)
    f_hat = torch.as_tensor(np.asarray(a.f_hat, np.float32))
    img32, img16 = ref.backend.decode(f_hat), low.backend.decode(f_hat)
    assert img16.dtype == torch.float32
    assert 30 < _psnr(img32, img16) < math.inf


@pytest.mark.slow
def test_generate_takes_the_precision_and_names_it(tmp_path):
    out = tmp_path / "x.png"
    r = run_cli("generate.py", "--model", TINY, "--random-init", "0", "--top-k", "20", "--class", "3",
                "--precision", "bf16", "--out", out)
    assert r.returncode == 0, r.stderr[-1500:]
    assert f"wrote {out} ({TINY} backend=eager-bf16 class=3 seed=0" in r.stdout
    r = run_cli("generate.py", "--artifacts", tmp_path / "art", "--precision", "bf16", "--out", tmp_path / "y.png")
    assert r.returncode == 2 and "fix the precision" in r.stderr and not (tmp_path / "y.png").exists()
