"""`scripts/evaluate.py`: FID, sFID, Inception Score, precision and recall with the ADM suite's definitions.

  python scripts/evaluate.py samples.npz VIRTUAL_imagenet256_labeled.npz --json metrics.json
  python scripts/evaluate.py --features samples_feats.npy ref_feats.npy      # FID, precision, recall

Inception weights (weights-inception-2015-12-05-6726825d.pth) come from --inception-weights FILE
or torch's hub cache; nothing is downloaded. --features takes two precomputed N x D arrays
(samples first, reference second) and needs no weights.
"""
from __future__ import annotations

import json
import os
import sys

from var_ssg.tools.cli import parser



def main(argv=None) -> int:
    p = parser("ADM-suite metrics for a samples .npz against a reference batch.")
    p.add_argument("files", nargs="*", metavar="NPZ", help="SAMPLES.npz REF.npz")
    p.add_argument("--features", nargs=2, metavar=("SAMPLES.npy", "REF.npy"),
                   help="precomputed N x D features: FID, precision, recall only")
    p.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--inception-weights", metavar="FILE", help="the FID Inception state dict (.pth)")
    p.add_argument("--extractor", choices=("inception", "pixels"), default="inception",
                   help="'pixels' = 8x8 block means: plumbing tests only, NOT FID")
    p.add_argument("--cache-dir", help="keep the reference's features here (computed once)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    from var_ssg.common.files import check_outputs       # output paths checked before any work
    check_outputs(("--json", a.json, ".json"))

    from var_ssg.common.errors import ConfigError
    if bool(a.features) == bool(a.files):
        raise ConfigError("give SAMPLES.npz REF.npz, or --features SAMPLES.npy REF.npy")
    if a.files and len(a.files) != 2:
        raise ConfigError(f"give exactly two files, SAMPLES.npz REF.npz (got {len(a.files)})")
    if a.cache_dir and not os.path.isdir(a.cache_dir):
        raise ConfigError(f"--cache-dir {a.cache_dir}: no such directory")
    if a.features:
        res = _from_features(*a.features)
    else:
        from tqdm import tqdm
        from var_ssg.evaluation.score import evaluate_files, make_extractor
        ext = make_extractor(a.extractor, a.inception_weights, a.device)
        with tqdm(desc=f"{ext.name} features", unit="img", file=sys.stderr) as bar:
            res = evaluate_files(a.files[0], a.files[1], ext, a.cache_dir, progress=bar.update)
    for k, v in res.items():
        print(f"{k}: {'n/a' if v is None else f'{v:.6g}'}")
    if a.json:
        from var_ssg.common.files import atomic_path
        with atomic_path(a.json) as tmp, open(tmp, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _from_features(samples_path: str, ref_path: str):
    import numpy as np
    from var_ssg.common.errors import ConfigError
    from var_ssg.evaluation.metrics import metrics_from_features
    arrs = []
    for path in (samples_path, ref_path):
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path} as a .npy array: {e}") from None
        if not isinstance(arr, np.ndarray) or arr.ndim != 2:
            raise ConfigError(f"{path}: need an N x D array, got {getattr(arr, 'shape', type(arr).__name__)}")
        arrs.append(arr)
    if arrs[0].shape[1] != arrs[1].shape[1]:
        raise ConfigError(f"feature sizes differ: {samples_path} has D={arrs[0].shape[1]}, "
                          f"{ref_path} D={arrs[1].shape[1]}")
    try:
        return metrics_from_features(*arrs)
    except ValueError as e:
        raise ConfigError(str(e)) from None

