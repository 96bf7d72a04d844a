#!/usr/bin/env python
"""The SSG paper's spectral diagnostics as one PNG (two panels).

  python scripts/spectrum.py --artifacts build/var-d16 --classes 0-999 --per-class 1 \
      --ref VIRTUAL_imagenet256_labeled.npz --out spectrum.png
  python scripts/spectrum.py --model var-d2-tiny --random-init 0 --classes 0-3 --per-class 2 \
      --ssg-beta linear:0.1,0.3 --compare-beta 0 --out spectrum.png --json spectrum.json

Panel 1: radial amplitude spectrum of the generated images relative to --ref (both schedules),
or with --ssg-beta relative to --compare-beta (default 0 = SSG off) when no --ref is given.
Panel 2: per scale k, the change of the latent f_hat's log amplitude from scale k-1 to k per
radial frequency bin, with each scale's Nyquist frequency pn_k/2 marked.
Both schedules use the same classes and seeds, so the images differ only by the guidance.
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
