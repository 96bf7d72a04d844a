"""Clipped activation ranges for the int8 step graph (DESIGN.md "Low precision", the paragraph
on why var-d16 missed the gate): MinMax gives an activation with a long tail (fc2's input, GELU's
output) a static step twice as coarse, relative to its typical value, as the other inputs get.
A clipped range trades a few saturated tail values for a finer step on all the others.

    the prepared fp32 step graph + the calibration feeds (export.calibrate.FeedStore)
      │ activation_histograms   the chosen MatMul inputs as extra outputs, run by ONNX Runtime's
      │                         CPU (no graph optimisation, as its MinMax calibrator runs), one
      │                         feed at a time: a histogram of |x| per tensor (AbsHistogram)
      │ clip_bound(rule)        "minmax": max|x|; "pQ": the Q-th percentile of |x|; "mse": the
      ▼                         bound c minimising int8's squared error (step c / 127, saturation
                                at c) over the histogram
    {tensor: c} -> quantize_static's TensorQuantOverrides [{"rmin": -c, "rmax": c}] (symmetric,
    zero point 0); the manifest's quantization.calibration records the rule and each c.

The histogram's bins are float32 bit patterns (|x|'s exponent and its 7 leading mantissa bits:
128 bins an octave, each under 0.8 % wide), so any magnitude is binned exactly and the same
values give the same bounds on every machine.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Sequence

import numpy as np

from var_ssg.common.errors import ConfigError

QMAX = 127                      # int8 symmetric: the step is c / QMAX
_SHIFT = 16                     # float32 bits >> 16: sign dropped, 8 exponent + 7 mantissa bits
_BINS = 1 << (31 - _SHIFT)


def _edge(i) -> np.ndarray:
    """The float32 whose bit pattern starts bin i (bin i covers [_edge(i), _edge(i + 1)))."""
    return (np.asarray(i, np.int64) << _SHIFT).astype(np.uint32).view(np.float32)


class AbsHistogram:
    """Counts of |x| in float32 bit-pattern bins, and the exact max|x|."""

    def __init__(self):
        self.counts = np.zeros(_BINS, np.int64)
        self.amax = 0.0

    def add(self, x: np.ndarray) -> None:
        a = np.ascontiguousarray(x, np.float32).reshape(-1)
        if a.size == 0:
            return
        bits = a.view(np.uint32) & np.uint32(0x7FFFFFFF)
        if int(bits.max()) >= 0x7F800000:
            raise ConfigError("a calibration activation holds inf or NaN: its int8 range cannot be set")
        self.counts += np.bincount(bits >> _SHIFT, minlength=_BINS)
        self.amax = max(self.amax, float(_as_float(bits.max())))

    @property
    def n(self) -> int:
        return int(self.counts.sum())


def _as_float(bits) -> np.float32:
    return np.asarray(bits, np.uint32).view(np.float32)


def clip_bound(h: AbsHistogram, rule: str) -> float:
    """The symmetric bound c of a tensor's int8 range by `rule` (module docstring); never above
    max|x|. An empty histogram gives 0 (the rule is still checked)."""
    if rule == "minmax":
        return h.amax
    if rule.startswith("p"):
        try:
            q = float(rule[1:])
        except ValueError:
            q = -1.0
        if not 50.0 <= q <= 100.0:
            raise ConfigError(f"clip_rule {rule!r}: a percentile rule is pQ with 50 <= Q <= 100 (e.g. p99.99)")
        if h.n == 0:
            return 0.0
        cum = np.cumsum(h.counts)
        j = int(np.searchsorted(cum, q / 100.0 * cum[-1]))
        return float(min(_edge(j + 1), np.float32(h.amax)))
    if rule == "mse":
        return _mse_bound(h) if h.n else 0.0
    raise ConfigError(f"clip_rule must be minmax, mse or pQ (a percentile of |x|, e.g. p99.99), got {rule!r}")


def _mse_bound(h: AbsHistogram, candidates: int = 512, points: int = 4) -> float:
    """argmin over c of the squared error of x -> clip(round(x / s), -127, 127) s, s = c / 127,
    summed over the histogram, each bin's values taken at `points` evenly spaced points inside it
    (the bins are under 0.8 % wide, finer than the step wherever the step is the error's size).
    The candidates are `candidates` bounds spaced evenly in log between max|x| / 256 and max|x|."""
    occ = np.flatnonzero(h.counts)
    lo, hi = _edge(occ).astype(np.float64), _edge(occ + 1).astype(np.float64)
    x = np.minimum(lo[:, None] + (hi - lo)[:, None] * (np.arange(points) + 0.5) / points, h.amax)   # bins x points
    w = h.counts[occ].astype(np.float64)[:, None] / points
    c = h.amax * np.exp2(np.linspace(-8.0, 0.0, candidates))
    err = np.empty(candidates)
    for i, ci in enumerate(c):
        s = ci / QMAX
        y = np.minimum(x, ci)
        err[i] = float(np.sum(w * ((y - s * np.rint(y / s)) ** 2 + (x - y) ** 2)))
    return float(np.float32(c[int(np.argmin(err))]))


def saturated(h: AbsHistogram, c: float) -> float:
    """The fraction of the recorded values with |x| above c (at bin resolution: bins above c's)."""
    if h.n == 0 or c >= h.amax:
        return 0.0
    j = int(np.asarray(c, np.float32).view(np.uint32)) >> _SHIFT
    return float(h.counts[j + 1:].sum() / h.n)


def activation_histograms(model_path: str, tensors: Sequence[str],
                          feeds: Iterable[Dict[str, np.ndarray]]) -> Dict[str, AbsHistogram]:
    """Run the graph at `model_path` (external data beside it) on every feed, with `tensors` as
    its outputs, and histogram |x| of each. The graph is run as ONNX Runtime's MinMax calibrator
    runs it (no optimisation), so max|x| is the range MinMax gives."""
    import onnx
    import onnxruntime as ort
    from onnx import helper as oh
    if not tensors:
        return {}
    m = onnx.load(model_path, load_external_data=False)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(oh.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    aug = os.path.join(os.path.dirname(os.path.abspath(model_path)), "clip-augmented.onnx")
    onnx.save(m, aug)                       # the same external data file, referenced, not copied
    del m
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(aug, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    hists = {t: AbsHistogram() for t in tensors}
    for feed in feeds:
        for t, x in zip(tensors, sess.run(list(tensors), {k: v for k, v in feed.items() if k in names})):
            hists[t].add(x)
    del sess
    os.remove(aug)
    return hists
