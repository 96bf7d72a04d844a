#!/usr/bin/env python
"""FID, sFID, Inception Score, precision and recall with the ADM suite's definitions.

  python scripts/evaluate.py samples.npz VIRTUAL_imagenet256_labeled.npz --json metrics.json
  python scripts/evaluate.py --features samples_feats.npy ref_feats.npy      # FID, precision, recall

Inception weights (weights-inception-2015-12-05-6726825d.pth) come from --inception-weights FILE
or torch's hub cache; nothing is downloaded. --features takes two precomputed N x D arrays
(samples first, reference second) and needs no weights.
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
