#!/usr/bin/env python
"""A grid of SSG beta schedules (x DSE transforms): sample + evaluate each point, then one table
and one plot (metric per schedule, with each point's latency). Resumable: rerun the same command
and finished samples and metrics are reused, an interrupted point continues where it stopped.

  python scripts/sweep.py --artifacts build/var-d16 --betas "0;linear:0.1,0.3;0.5" \
      --classes 0-999 --per-class 50 --ref VIRTUAL_imagenet256_labeled.npz --out-dir sweep/
  python scripts/sweep.py --model var-d16 --ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth \
      --dse dct,dft --betas "0;0.2" ...                 # eager: any transform without re-exporting
  python scripts/sweep.py --artifacts build/d16-dct,build/d16-dft ...   # one export per transform

Per point: OUT_DIR/<dse>_<schedule>/samples.npz (+ .partial/ while running), metrics.json;
OUT_DIR/sweep.json and sweep.png. Without --ref only the latency is measured.
--extractor pixels replaces Inception by 8x8 block means: for plumbing tests, NOT FID.
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
