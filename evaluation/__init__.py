"""SSG evaluation: ADM-format sample batches, the ADM suite's metrics (FID, sFID, IS,
precision, recall), beta sweeps and the paper's spectral diagnostics.

  metrics.py    FID / IS / precision-recall on feature arrays (the math; no weights needed)
  inception.py  the FID Inception-v3 (TF 2015-12-05 graph) in PyTorch, weights from a local file
  score.py      samples .npz + reference .npz → metrics dict (inception or pixel features)
  samples.py    the .npz layout, streamed in chunks; class-range parsing
  run.py        JobRequest → Job: the batch/seed layout, batches run, f_hat capture
  sampling.py   resumable sampling into an .npz: the partial run, its lock, the merge; executors
  distributed.py  the Ray worker pool (evaluation's only Ray code)
  sweep.py      a grid of beta schedules x DSE transforms: samples, metrics, table, plot
  spectrum.py   radial image spectra and per-scale latent spectra
  plots.py      the PNGs
"""
