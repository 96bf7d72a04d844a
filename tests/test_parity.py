"""Parity's pieces on their own (the float64 reference sampler, the flip-rate model, the
Poisson tail, seeded random weights), and teacher-forced parity on the real vocabulary
(var-d2: the official VQVAE shape, V = 4096): it passes on correct artifacts with every token
drawn by the backend's own logits. Planted bugs: tests/test_parity_mutants.py."""
import json
import math
import shutil

import pytest
import torch

from tests.conftest import run_script

slow = pytest.mark.slow


def test_float64_sampler_gives_the_graph_samplers_tokens():
    """On fp32 logits, graphs.sampling (fp32, as exported) and the float64 reference draw the
    same token except where u or the top-p mass is within ROUND_EPS of an edge."""
    from var_ssg.graphs.sampling import sample_with_support
    from var_ssg.runtime.parity import _rounding_tie, reference_sample
    g = torch.Generator().manual_seed(0)
    for k_max, top_k, top_p, T in ((900, 900, 0.96, 1.0), (900, 100, 0.9, 1.4), (900, 2, 1.0, 0.25), (0, 4096, 0.5, 3.0)):
        l = torch.randn(1, 400, 4096, generator=g) * 2
        u = torch.rand(1, 400, generator=g)
        one = lambda x, dt=torch.float32: torch.tensor([x], dtype=dt).view(1, 1, 1)    # noqa: E731
        tok, _ = sample_with_support(l, u, one(T), one(top_k, torch.int64), one(top_p), k_max)
        col = lambda x, dt=torch.float64: torch.full((400, 1), x, dtype=dt)              # noqa: E731
        T64, tp64 = float(torch.tensor(T, dtype=torch.float32)), float(torch.tensor(top_p, dtype=torch.float32))
        ref = reference_sample(l[0].double(), u[0].double(), col(T64), col(top_k, torch.int64), col(tp64), k_max)
        bad = (ref.tokens != tok[0]).nonzero().flatten().tolist()
        assert len(bad) <= 2, (k_max, top_k, top_p, T, len(bad))
        for j in bad:
            assert _rounding_tie(l[0, j:j + 1].double(), u[0, j:j + 1].double(), col(T64)[:1],
                                 col(top_k, torch.int64)[:1], tp64, k_max, int(tok[0, j]))


def test_flip_rate_model_matches_monte_carlo():
    """The expected flip probability of a position (share of u that lands in different tokens)
    against drawing u many times."""
    from var_ssg.runtime.parity import _draw, _intervals, _kept
    g = torch.Generator().manual_seed(1)
    l = torch.randn(1, 4096, generator=g, dtype=torch.float64) * 2
    l2 = l + torch.randn(1, 4096, generator=g, dtype=torch.float64) * 2e-3        # an fp16-sized difference
    u = torch.rand(20000, generator=g, dtype=torch.float64)
    one = lambda x, dt=torch.float64: torch.tensor([[x]], dtype=dt)                   # noqa: E731
    bins, toks = [], []
    for x in (l, l2):
        q, order = _kept(x, one(1.0), one(900, torch.int64), one(0.96), 900)
        _, cdf = _draw(q, order, u[:1])
        bins.append(_intervals(q, order, cdf, 4096))
        j = torch.searchsorted(cdf[0], u, right=True).clamp_max(int((q[0] > 0).sum()) - 1)
        toks.append(order[0, j])
    (lo_a, hi_a), (lo_b, hi_b) = bins
    p = float(1 - (torch.minimum(hi_a, hi_b) - torch.maximum(lo_a, lo_b)).clamp_min(0).sum())
    seen = float((toks[0] != toks[1]).double().mean())
    assert 0.01 < p < 0.5 and abs(seen - p) < 5 * math.sqrt(p / len(u)), (p, seen)


def test_poisson_tail():
    from scipy.stats import poisson
    from var_ssg.runtime.parity import poisson_tail
    for n, lam in ((0, 3.0), (3, 3.0), (10, 3.0), (39, 3.0), (400, 313.8), (5, 0.0), (1, 1e-9)):
        assert poisson_tail(n, lam) == pytest.approx(poisson.sf(n - 1, lam) if n > lam else 1.0, rel=1e-6, abs=1e-300)


def test_random_weights_biases_and_norms_non_zero_and_thread_independent():
    from var_ssg.graphs.config import get_preset
    from var_ssg.graphs.weights import _random_fill, random_state_dicts
    var_sd, vae_sd = random_state_dicts(get_preset("var-d2-tiny"), 0)
    for sd in (var_sd, vae_sd):
        for k, v in sd.items():
            if (k.endswith("bias") or "norm" in k) and not k.endswith("zero_k_bias") and v.is_floating_point():
                assert bool((v != 0).all()), k
    jobs = [("var", "w", (3, 1 << 21), 0.0, 0.5), ("var", "b", (7,), 1.0, 0.1)]
    one, many = _random_fill(jobs, 5, threads=1), _random_fill(jobs, 5, threads=3)
    assert all(torch.equal(one[k], many[k]) for k in one)
    assert abs(float(one["w"].std()) - 0.5) < 1e-3 and abs(float(one["w"].mean())) < 1e-3
ARGS = ["--class", "11", "907", "--ssg-beta", "linear:0.8,0.2"]


@pytest.fixture(scope="module")
def d2(artifacts):
    """var-d2 artifacts (fp32, batch 2, dct), exported once per session (also the mutants' clean
    set). The DSE transform does not meet the vocabulary: dft runs on var-d2-tiny."""
    return artifacts(preset="var-d2", batch=2)


def parity(capsys, *args):
    """scripts/parity.py in this process -> (exit code, stdout)."""
    from var_ssg.tools.commands.parity import main
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc or 0, capsys.readouterr().out


@slow
def test_parity_passes_on_v4096_with_explained_flips(d2, tmp_path, capsys):
    js, seeds = tmp_path / "p.json", "0-1"                                     # 2 seeds, 4 images
    rc, out = parity(capsys, "--artifacts", d2, *ARGS, "--seeds", seeds, "--json", js)
    assert rc == 0, out[-3000:]
    rep = json.loads(js.read_text())
    runs = rep["runs"]
    assert not rep["failures"] and rep["weights"]["compared"] > 100 and not rep["weights"]["failures"]
    assert len(runs) == len(seeds.split("-")) and all(x["ok"] and x["mode"] == "teacher-forced" and
                                                      len(x["rows"]) == 20 for x in runs)
    from var_ssg.runtime.parity import BOUNDS
    assert all(row["logits_rel"] <= BOUNDS["fp32"] and row["logits_cfg_rel"] <= BOUNDS["fp32"] for x in runs
               for row in x["rows"])
    assert {row["run"] for x in runs for row in x["rows"]} == {"rows", "probe"}      # the probe row ran
    flips = [f for x in runs for f in x["flips"]]
    assert all(f["explained"] and f["why"] in ("its own logits give it", "fp32 rounding tie") for f in flips)
    assert "parity OK" in out and f"{len(flips)} token flips (expected" in out
    assert "exported tensors equal the reference's, bit for bit" in out
    for f in flips[:10]:                                     # the table shows them
        assert f"flip {f['run']} scale {f['scale']} row {f['row']} pos {f['pos']}" in out


@slow
def test_sweep_writes_its_json(d2, tmp_path, capsys, monkeypatch):
    """--sweep --json stored tuples and called .to_json() on them: it crashed on a failure and
    wrote [] on success. Two settings keep it short."""
    from var_ssg.runtime import sweep
    monkeypatch.setattr(sweep, "sweep_settings", lambda *a, **k: [("seed 0", dict(seed=0)),
                                                                           ("T 3.0", dict(temperature=3.0))])
    js = tmp_path / "s.json"
    rc, out = parity(capsys, "--artifacts", d2, "--backends", "eager,onnxruntime", "--sweep", "--json", js)
    assert rc == 0 and "sweep OK" in out, out[-2000:]
    rep = json.loads(js.read_text())
    (sw,) = rep["sweeps"]
    assert sw["backend"] == "onnxruntime" and [s.split(":")[0] for s in sw["settings"]] == ["seed 0", "T 3.0"]
    assert sw["noise"]["logits_rel"] > 0 and not sw["failures"] and not rep["failures"]


@slow
def test_more_smooth_and_unconditional_under_parity(d2, capsys):
    rc, out = parity(capsys, "--artifacts", d2, "--class", "-1", "5", "--more-smooth", "--seeds", "3")
    assert rc == 0 and "parity OK" in out, out[-3000:]


@slow
def test_free_running_is_a_report(artifacts, capsys):
    rc, out = parity(capsys, "--artifacts", artifacts(batch=3, transform="dft"), *ARGS, "--seeds", "4", "--top-k", "50",
                     "--free-running")
    assert rc == 0, out[-3000:]
    assert "free-running" in out and "images equal" in out and "PSNR" in out


@slow
def test_artifacts_without_the_forcing_input_say_reexport(d2, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(d2, old)
    man = json.loads((old / "manifest.json").read_text())
    man["graphs"]["step"]["inputs"] = [i for i in man["graphs"]["step"]["inputs"] if i["name"] not in ("forced", "force")]
    (old / "manifest.json").write_text(json.dumps(man))
    r = run_script("parity.py", "--artifacts", old, "--seeds", "0")
    assert r.returncode == 2 and "re-export" in r.stderr and len(r.stderr.strip().splitlines()) == 1
