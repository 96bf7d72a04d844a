"""Evaluation tools: metric math against independent computations, spectra of known signals,
resumable sampling, and the scripts end to end on the tiny model (eager: no export needed)."""
import json
import os

import numpy as np
import pytest
import torch

from var_ssg.evaluation import metrics as M
from var_ssg.evaluation import spectrum as sp
from var_ssg.evaluation.samples import NpzBatch, parse_classes, read_timing
from var_ssg.common.errors import ConfigError
from tests.conftest import ROOT, run_cli

TINY = ["--model", "var-d2-tiny", "--random-init", "0"]


def _env(tmp_path):
    # scripts import `evaluation` from this tree; TORCH_HOME: an empty hub cache (no Inception weights)
    return {"PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
            "TORCH_HOME": str(tmp_path / "torch_home")}


def _one_line_error(r):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    return lines[0]


# ---------------------------------------------------------------- metric math

def _fid_by_hand(a, b):
    """Fréchet distance via symmetric eigendecompositions (no scipy.linalg.sqrtm):
    tr sqrt(S1 S2) = tr sqrt(S1^½ S2 S1^½), all symmetric PSD."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def psd_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = psd_sqrt(s1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_fid_equals_independent_computation():
    rng = np.random.default_rng(0)
    D = 6
    a = rng.normal(0.0, 1.0, (2000, D)) * np.linspace(0.5, 2.0, D)       # diagonal Gaussians
    b = rng.normal(0.3, 1.0, (1500, D)) * np.linspace(1.5, 0.7, D)
    fid = M.frechet_distance(M.GaussianStats.of(a), M.GaussianStats.of(b))
    assert fid == pytest.approx(_fid_by_hand(a, b), rel=1e-9, abs=1e-9)
    # and close to the population closed form for diagonal Gaussians: Σ (m1-m2)² + (σ1-σ2)²
    pop = D * 0.3 ** 2 + ((np.linspace(0.5, 2.0, D) - np.linspace(1.5, 0.7, D)) ** 2).sum()
    assert fid == pytest.approx(pop, rel=0.1)
    assert abs(M.frechet_distance(M.GaussianStats.of(a), M.GaussianStats.of(a))) < 1e-8


def test_fid_singular_covariances_stay_finite():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 12)), rng.normal(size=(6, 12))             # N < D: rank-deficient
    assert np.isfinite(M.frechet_distance(M.GaussianStats.of(a), M.GaussianStats.of(b)))


def _pr_brute_force(ref, smp, k=3):
    def radii(x):
        return [sorted(((x[i] - x[j]) ** 2).sum() for j in range(len(x)))[k] for i in range(len(x))]
    r_ref, r_smp = radii(ref), radii(smp)
    prec = np.mean([any(((s - ref[j]) ** 2).sum() <= r_ref[j] for j in range(len(ref))) for s in smp])
    rec = np.mean([any(((r - smp[j]) ** 2).sum() <= r_smp[j] for j in range(len(smp))) for r in ref])
    return prec, rec


def test_precision_recall_equal_brute_force():
    rng = np.random.default_rng(2)
    ref = rng.normal(0, 1, (60, 4))
    smp = np.concatenate([rng.normal(0, 0.6, (30, 4)), rng.normal(2.5, 1, (25, 4))])   # half off-manifold
    got = M.precision_recall(ref, smp, block=16)                                  # blocks smaller than N
    want = _pr_brute_force(ref, smp)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.2 < got[0] < 0.9 and 0.2 < got[1] < 1.0                               # a non-trivial case
    assert M.metrics_from_features(smp, ref)["precision"] == pytest.approx(want[0])


def test_inception_score_known_values():
    assert M.inception_score(np.zeros((10, 1008))) == pytest.approx(1.0)          # every p(y|x) uniform
    onehot = np.full((40, 8), -1e4)
    onehot[np.arange(40), np.arange(40) % 8] = 0.0                                # sure and evenly spread
    assert M.inception_score(onehot) == pytest.approx(8.0, rel=1e-6)
    assert M.inception_score(onehot, split=16) == pytest.approx(8.0, rel=1e-6)    # 16, 16, 8: each uniform
    # split 20 = 2.5 cycles: per split p(y) is uneven, IS = exp(H(p(y))) averaged over the two splits
    p = np.bincount(np.arange(20) % 8, minlength=8) / 20
    assert M.inception_score(onehot, split=20) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)


@pytest.mark.slow
def test_evaluate_features_cli(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, (80, 5)), rng.normal(0.5, 1, (90, 5))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = tmp_path / "m.json"
    r = run_cli("evaluate.py", "--features", tmp_path / "a.npy", tmp_path / "b.npy", "--json", out,
                   env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())
    assert set(got) == {"fid", "precision", "recall"}
    assert got["fid"] == pytest.approx(_fid_by_hand(a, b), rel=1e-8)
    assert (got["precision"], got["recall"]) == pytest.approx(_pr_brute_force(b, a))
    np.save(tmp_path / "c.npy", rng.normal(size=(10, 3)))
    assert "feature sizes differ" in _one_line_error(
        run_cli("evaluate.py", "--features", tmp_path / "a.npy", tmp_path / "c.npy", env=_env(tmp_path)))


# ---------------------------------------------------------------- Inception

@pytest.mark.slow
def test_inception_features_and_missing_weights(tmp_path, samples):
    from var_ssg.evaluation.inception import FIDInception, load_inception
    torch.manual_seed(0)
    net = FIDInception()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    net = load_inception(str(tmp_path / "w.pth"))
    imgs = NpzBatch(samples).images(limit=2)
    f = net(torch.from_numpy(imgs))
    assert f["pool"].shape == (2, 2048) and f["spatial"].shape == (2, 7 * 17 * 17) and f["logits"].shape == (2, 1008)
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="not the FID Inception state dict"):
        load_inception(str(tmp_path / "bad.pth"))
    # no weights anywhere: one line naming the file and where to get it, exit 2, nothing downloaded
    msg = _one_line_error(run_cli("evaluate.py", samples, samples, env=_env(tmp_path)))
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "https://" in msg
    assert not os.path.exists(tmp_path / "torch_home" / "hub" / "checkpoints")


def test_inception_matches_torch_fidelity():
    """Our module against torch-fidelity's TF-exact extractor, where that package imports."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as TF
    except Exception:     # noqa: BLE001 - absent, or its torchvision does not load next to this torch
        pytest.skip("torch-fidelity not importable here")
    from var_ssg.evaluation.inception import FIDInception
    torch.manual_seed(0)
    ours = FIDInception().eval()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        torch.save(ours.state_dict(), os.path.join(d, "w.pth"))
        ref = TF("inception-v3-compat", ["2048", "logits_unbiased"],
                 feature_extractor_weights_path=os.path.join(d, "w.pth"))
    imgs = torch.randint(0, 256, (2, 64, 80, 3), dtype=torch.uint8)
    pool, logits = ref(imgs.permute(0, 3, 1, 2).contiguous())
    got = ours(imgs)
    assert torch.allclose(got["pool"], pool, atol=1e-5) and torch.allclose(got["logits"], logits, atol=1e-5)


# ---------------------------------------------------------------- spectra

def test_radial_spectrum_peaks_at_grating_frequency():
    H = W = 64
    y, x = np.mgrid[0:H, 0:W]
    for fy, fx, want in [(0, 7, 7), (3, 4, 5), (12, 0, 12)]:          # (3, 4): radius 5
        g = 128 + 100 * np.cos(2 * np.pi * (fy * y / H + fx * x / W))
        img = np.repeat(g[None, :, :, None], 3, axis=3).astype(np.uint8)
        prof = sp.image_spectrum([img])
        assert prof.shape == (W // 2 + 1,)
        assert int(np.argmax(prof)) == want
    lat = sp.latent_profiles([torch.ones(1, 2, 16, 16), torch.ones(1, 2, 16, 16) +
                              torch.cos(2 * np.pi * 4 * torch.arange(16) / 16)])
    d = sp.latent_delta(lat)
    assert d.shape == (1, 9) and int(np.argmax(d[0])) == 4          # scale 1 added frequency 4
    assert sp.nyquist_bins((1, 2, 16)) == [0.5, 1.0, 8.0]


def test_parse_classes():
    assert parse_classes("0-3,7,2") == [0, 1, 2, 3, 7]
    for bad, msg in (("5-2", "range 5-2 runs backwards"), ("a", "use ids and ranges like"),
                     ("1000", "class id 1000 is outside 0..999"), ("1,,2", "use ids and ranges like")):
        with pytest.raises(ConfigError, match=f"--classes '{bad}': {msg}"):
            parse_classes(bad)


# ---------------------------------------------------------------- sampling, end to end

SAMPLE_ARGS = [*TINY, "--classes", "3,1", "--per-class", "2", "--batch", "3", "--seed", "5",
               "--ssg-beta", "0.5", "--top-k", "20"]


def _sample(*args):
    from var_ssg.tools.commands import sample
    return sample.main([*SAMPLE_ARGS, *map(str, args)])


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """One uninterrupted run: 4 images in batches of 3 (the second batch padded)."""
    d = tmp_path_factory.mktemp("samples")
    out, pngs = d / "full.npz", d / "png"
    pngs.mkdir()
    assert _sample("--out", out, "--png-dir", pngs) == 0
    assert sorted(os.listdir(pngs)) == ["000000_c3.png", "000001_c3.png", "000002_c1.png", "000003_c1.png"]
    return str(out)


@pytest.mark.slow
def test_sample_npz_layout(samples):
    b = NpzBatch(samples)
    assert b.shape == (4, 256, 256, 3)
    with np.load(samples) as z:                                   # what ADM's evaluator reads
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (4, 256, 256, 3)
        assert z["labels"].tolist() == [3, 3, 1, 1]
        assert sorted(z.files) == ["arr_0", "labels", "settings"]  # no clock reading inside
    s = b.settings
    assert s["seed"] == 5 and s["batch"] == 3 and s["ssg_beta"] == "0.5" and s["top_k"] == 20
    assert s["classes"] == [3, 1] and s["per_class"] == 2 and "RANDOM" in s["weights"]
    assert not os.path.exists(samples + ".partial")
    seconds, rows = read_timing(samples)                           # beside it: OUT.timing.json
    assert seconds > 0 and rows == 6 and samples.endswith(".npz") and os.path.isfile(samples[:-4] + ".timing.json")


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.slow
def test_sample_interrupted_and_resumed_equals_uninterrupted(tmp_path, samples, caplog):
    out = tmp_path / "cut.npz"
    assert _sample("--out", out, "--max-batches", "1") == 3        # stopped, partial state kept
    assert not out.exists()
    assert sorted(os.listdir(str(out) + ".partial")) == [".lock", "batch_000000.npz", "settings.json"]
    done = os.path.join(str(out) + ".partial", "batch_000000.npz")
    mtime = os.stat(done).st_mtime_ns
    # without --resume, or with other settings: refused before any work, nothing touched
    with pytest.raises(ConfigError, match="pass --resume"):
        _sample("--out", out)
    with pytest.raises(ConfigError, match="seed"):
        _sample("--seed", "6", "--out", out, "--resume")
    assert os.stat(done).st_mtime_ns == mtime
    with caplog.at_level("INFO"):
        assert _sample("--out", out, "--resume") == 0
    assert "resuming: 1 of 2 batches done" in caplog.text
    assert _bytes(out) == _bytes(samples)                          # the same bytes as one run
    assert not os.path.exists(str(out) + ".partial")
    # a finished file with --resume is left alone
    mtime = os.stat(out).st_mtime_ns
    assert _sample("--out", out, "--resume") == 0
    assert os.stat(out).st_mtime_ns == mtime


def test_sample_bad_input_one_line_nothing_written(tmp_path):
    for extra, msg in ((["--classes", "9-2"], "range 9-2 runs backwards"),
                       (["--ssg-beta", "linear:1"], "linear needs START,END"),
                       (["--per-class", "0"], "--per-class must be >= 1, got 0"),
                       (["--top-p", "2"], r"--top-p must be in \[0, 1\] \(0 = off\), got 2.0"),
                       (["--workers", "2"], "--workers and --chunk need --address")):    # --workers without --address
        with pytest.raises(ConfigError, match=msg):
            _sample(*extra, "--out", tmp_path / "x.npz")
    assert os.listdir(tmp_path) == []


SMALL = ["--classes", "3", "--per-class", "2", "--batch", "1"]          # 2 batches of one image


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "small.npz"
    assert _sample(*SMALL, "--out", out) == 0
    return str(out)


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_resume_with_damaged_settings_is_one_line(tmp_path, damage):
    out = tmp_path / "cut.npz"
    part = str(out) + ".partial"
    os.makedirs(part)
    with open(os.path.join(part, "settings.json"), "wb") as f:
        f.write(damage)
    with open(os.path.join(part, "batch_000000.npz"), "wb") as f:
        f.write(b"a finished batch")
    with pytest.raises(ConfigError, match="settings.json is missing or damaged.*delete"):
        _sample(*SMALL, "--out", out, "--resume")
    assert os.path.exists(os.path.join(part, "batch_000000.npz"))    # the user's work stays


@pytest.mark.slow
def test_resume_redoes_a_truncated_batch(tmp_path, small, caplog):
    out = tmp_path / "cut.npz"
    assert _sample(*SMALL, "--out", out, "--max-batches", "1") == 3
    path = os.path.join(str(out) + ".partial", "batch_000000.npz")
    data = _bytes(path)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        assert _sample(*SMALL, "--out", out, "--resume") == 0
    assert "damaged: redoing that batch" in caplog.text
    assert _bytes(out) == _bytes(small)


@pytest.mark.slow
@pytest.mark.parametrize("keep_sum", [True, False])
def test_resume_redoes_a_batch_whose_content_does_not_match_its_checksum(tmp_path, small, caplog, keep_sum):
    """The issue's probe: a batch file rewritten with the right structure but black pixels (its
    checksum kept, or left out as a hand-written file would) is redone, never merged."""
    import numpy as np
    out = tmp_path / "cut.npz"
    assert _sample(*SMALL, "--out", out, "--max-batches", "1") == 3
    path = os.path.join(str(out) + ".partial", "batch_000000.npz")
    with np.load(path) as z:
        members = {k: z[k] for k in z.files}
    assert "sha256" in members and members["images"].any()
    members["images"] = np.zeros_like(members["images"])
    if not keep_sum:
        del members["sha256"]
    with open(path, "wb") as f:
        np.savez(f, **members)
    with caplog.at_level("WARNING"):
        assert _sample(*SMALL, "--out", out, "--resume") == 0
    assert "damaged: redoing that batch" in caplog.text
    assert _bytes(out) == _bytes(small)


@pytest.mark.slow
def test_killed_while_writing_settings_starts_afresh(tmp_path, small):
    """A sampler killed before its settings were renamed into place leaves a folder holding only
    a temporary file: with or without --resume the run starts (no loop between 'pass --resume'
    and 'no such file')."""
    from var_ssg.evaluation.sampling import check_output
    out = tmp_path / "k.npz"
    os.makedirs(str(out) + ".partial")
    with open(os.path.join(str(out) + ".partial", ".settings.json.0a1b2c3d.tmp.json"), "w") as f:
        f.write('{"format": "var-s')
    assert check_output(str(out), None, resume=False) == check_output(str(out), None, resume=True) == "fresh"
    assert _sample(*SMALL, "--out", out, "--resume") == 0
    assert _bytes(out) == _bytes(small) and not os.path.exists(str(out) + ".partial")


@pytest.mark.slow
def test_per_class_beyond_the_disk_is_refused_before_work(tmp_path):
    with pytest.raises(ConfigError, match=r"1,000,000,000 images of 256x256 need about .* free"):
        _sample("--classes", "3", "--per-class", "1000000000", "--batch", "1", "--out", tmp_path / "x.npz",
                "--max-batches", "1")
    assert os.listdir(tmp_path) == []


def test_png_dir_that_takes_no_files_is_refused_before_work(tmp_path):
    with pytest.raises(ConfigError, match=r"--png-dir /proc: cannot write there"):
        _sample("--out", tmp_path / "x.npz", "--png-dir", "/proc")
    assert os.listdir(tmp_path) == []


def test_out_that_is_a_folder_is_named_so(tmp_path):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(ConfigError, match="d.npz is a directory"):
        _sample("--out", tmp_path / "d.npz", "--resume")


@pytest.mark.slow
def test_spectrum_script_end_to_end(tmp_path, samples):
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    r = run_cli("spectrum.py", *TINY, "--classes", "0-1", "--per-class", "1", "--batch", "2",
                   "--ssg-beta", "1.0", "--compare-beta", "0", "--ref", samples, "--out", png, "--json", js,
                   env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert Image.open(png).size[0] > 600
    out = json.loads(js.read_text())
    assert set(out["image_ratio"]) == {"beta 1.0 / reference", "beta 0 / reference"}
    assert len(out["image_bins"]) == 129                                   # 256 px: bins 0..128
    d = np.array(out["latent_delta_logmag"]["beta 1.0"])
    assert d.shape == (9, 9) and np.isfinite(d).all()                      # scales 1..9, 16x16 latent
    assert out["nyquist"] == [p / 2 for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]


@pytest.mark.slow
def test_sweep_script_end_to_end_and_resumes(tmp_path, samples):
    args = [*TINY, "--classes", "2,9", "--per-class", "2", "--batch", "4", "--betas", "0;0.5", "--dse", "dct,dft",
            "--out-dir", tmp_path, "--ref", samples, "--extractor", "pixels"]
    r = run_cli("sweep.py", *args, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    table = r.stdout.splitlines()
    assert table[0].split() == ["dse", "beta", "fd_pixels", "precision_pixels", "recall_pixels", "s_per_img"]
    assert len(table) >= 5
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(x["dse"], x["beta"]) for x in rows] == [("dct", "0"), ("dct", "0.5"), ("dft", "0"), ("dft", "0.5")]
    assert all(x["s_per_img"] > 0 and x["fd_pixels"] >= 0 and 0 <= x["precision_pixels"] <= 1 for x in rows)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    with np.load(tmp_path / "dct_0" / "samples.npz") as a, np.load(tmp_path / "dft_0" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])                     # beta 0: the transform is unused
    # rerun: every point is reused (no sampling, no metric recomputation)
    stamps = {p: os.stat(tmp_path / p / "samples.npz").st_mtime_ns for p in ("dct_0", "dft_0.5")}
    r = run_cli("sweep.py", *args, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert {p: os.stat(tmp_path / p / "samples.npz").st_mtime_ns for p in stamps} == stamps
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == rows


def test_second_sampler_on_the_same_output_is_refused(tmp_path):
    """The driver holds an flock on OUT.partial/.lock for its whole run: no batch has two writers."""
    from var_ssg.evaluation.run import Job
    from var_ssg.evaluation.sampling import PartialRun
    from var_ssg.graphs.config import SamplerConfig, make_ssg
    job = Job(classes=(3,), per_class=2, seed=0, guidance=1.5, sampler=SamplerConfig(), ssg=make_ssg("0"), batch=1)
    settings = {"image_size": 16, "seed": 0}
    out = str(tmp_path / "x.npz")
    first = PartialRun(out, job, settings).open(resume=False)
    try:
        with pytest.raises(ConfigError, match="being written by another sampler"):
            PartialRun(out, job, settings).open(resume=True)
    finally:
        first.close()
    again = PartialRun(out, job, settings).open(resume=True)        # free once the first let go
    assert again.todo == [0, 1]
    again.close()
