"""`scripts/sample.py`: Sample class-conditional images into an ADM-format .npz (arr_0 uint8 N H W 3, labels, settings).

  python scripts/sample.py --artifacts build/var-d16 --classes 0-999 --per-class 50 --seed 0 \\
      --ssg-beta linear:0.1,0.3 --out samples.npz [--resume] [--png-dir DIR]
  python scripts/sample.py --model var-d2-tiny --random-init 0 --classes 0-3 --per-class 2 --out s.npz
  python scripts/sample.py --artifacts build/var-d16 --device cuda --address local ...   # one worker per GPU
  python scripts/sample.py --artifacts /shared/var-d16 --device cuda --address auto ...  # a Ray cluster

Resumable: finished batches live in OUT.partial/ until OUT is written; rerun with --resume after
an interruption (same settings) and nothing finished is redone. Image i uses seed S + i, so OUT
has the same bytes in one process or on any number of workers (--address, --workers).
Exit codes: 0 done, 2 bad input (one line), 3 stopped early by --max-batches (rerun with --resume).
"""
from __future__ import annotations

import sys

from var_ssg.graphs.config import DEFAULT_GUIDANCE, DEFAULT_TOP_P
from var_ssg.tools.cli import add_model_args, add_sampling_args, note_random_weights, parser
from var_ssg.tools.infinity_cli import add_prompts_args, check_prompts_args
from var_ssg.tools.evalargs import (add_cluster_args, add_job_args, add_source_args, pool_from_args, print_workers,
                            request_from_args, source_from_args)


def main(argv=None) -> int:
    p = parser("Sample images into an ADM-format .npz (resumable).")
    add_model_args(p)
    add_sampling_args(p)
    add_source_args(p)
    add_job_args(p, per_class=50)
    add_cluster_args(p)
    p.add_argument("--out", required=True, help="samples .npz")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (same settings)")
    p.add_argument("--png-dir", help="also write every image as a PNG into this existing folder")
    p.add_argument("--max-batches", type=int, help="stop after this many new batches (time-sliced jobs)")
    add_prompts_args(p)
    p.set_defaults(guidance=None, top_p=None, per_class=None)   # each family's own default (VAR's or Infinity's)
    a = p.parse_args(argv)
    from var_ssg.runtime.infinity import is_infinity
    infinity = is_infinity(a.model, a.artifacts)
    check_prompts_args(a, infinity)
    if infinity:                        # prompts: DESIGN.md "Samples from a prompt list"
        from var_ssg.tools import infinity_cli
        return infinity_cli.sample(a)
    a.guidance = DEFAULT_GUIDANCE if a.guidance is None else a.guidance
    a.top_p = DEFAULT_TOP_P if a.top_p is None else a.top_p
    a.per_class = 50 if a.per_class is None else a.per_class
    request, pool = request_from_args(a), pool_from_args(a)
    request.check()

    from tqdm import tqdm
    from var_ssg.evaluation.sampling import sample
    bar = None

    def progress(done, total):      # the bar opens only once the run passed its checks
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=done, desc="sample", unit="img", file=sys.stderr, smoothing=0.1)
        bar.update(done - bar.n)

    try:
        res = sample(source_from_args(a, (a.dse,) if a.dse else ()), request, a.out, resume=a.resume,
                     png_dir=a.png_dir, max_batches=a.max_batches, pool=pool, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print_workers(res.workers)
    if not res.complete:
        print(f"stopped after --max-batches {a.max_batches}: rerun with --resume to continue", file=sys.stderr)
        return 3
    job = res.job
    print(f"wrote {a.out}: {job.num_images} images, {len(job.classes)} classes x {job.per_class}, "
          f"ssg={job.ssg.spec} dse={job.ssg.transform}; {res.source}")
    note_random_weights(res.source)
    return 0

