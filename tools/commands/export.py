"""`scripts/export.py`: Export VAR + SSG (or Infinity) to ONNX artifacts (and TensorRT engines with --target trt).

  python scripts/export.py --model var-d24 --random-init 0 --out build/var-d24
  python scripts/export.py --model var-d16 --ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth --out build/d16
  python scripts/export.py --model infinity-tiny --random-init 0 --out build/inf-tiny
"""
from __future__ import annotations

import resource
import time

from var_ssg.tools.cli import add_model_args, parser
from var_ssg.graphs.config import DEFAULT_TOP_K, DSE_TRANSFORMS, get_preset


def main(argv=None) -> int:
    p = parser("Export VAR + SSG to ONNX artifacts.")
    add_model_args(p, model_required=True)
    p.add_argument("--out", required=True, help="artifacts directory (written atomically)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 | fp16 | bf16 (transformer + KV) | int8 (QDQ weight MatMuls, calibrated: ONNX Runtime "
                        "CPU and TensorRT) | fp8 (the same in float8 e4m3fn: TensorRT on compute capability >= 8.9 "
                        "only); DSE, SSG and sampling stay fp32")
    p.add_argument("--batch", type=int, default=1, help="images per run, fixed at export (2x rows with CFG)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="TopK K baked in; runs may use any top-k <= it; 0 = none")
    p.add_argument("--dse", choices=DSE_TRANSFORMS, default="dct")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 19 for fp8)")
    p.add_argument("--target", choices=("onnx", "trt"), default="onnx")
    p.add_argument("--trt-hardware-compatible", action="store_true", help="engines for Ampere and newer GPUs")
    p.add_argument("--trt-version-compatible", action="store_true", help="engines for later TensorRT of this major")
    p.add_argument("--trt-tf32", action="store_true", help="let TensorRT run fp32 MatMuls in TF32 (off: true fp32)")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it holds other var-ssg artifacts (never a folder of other files)")
    a = p.parse_args(argv)
    if a.model.startswith("infinity-"):         # text-to-image: DESIGN.md "Infinity"
        from var_ssg.tools.infinity_cli import export as export_infinity
        return export_infinity(a)

    from var_ssg.export.onnx_export import ExportConfig, check_out, default_opset, export_artifacts
    from var_ssg.graphs.weights import load_models
    from var_ssg.tools.progress import StageDisplay

    t0 = time.time()
    cfg = get_preset(a.model)
    ec = ExportConfig(precision=a.precision, batch=a.batch, transform=a.dse,
                      top_k=a.top_k, opset=default_opset(a.precision) if a.opset is None else a.opset, target=a.target,
                      trt_hardware_compatible=a.trt_hardware_compatible, trt_version_compatible=a.trt_version_compatible,
                      trt_tf32=a.trt_tf32)
    check_out(a.out)                  # user files, a file, a bad name: refused before loading weights
    with StageDisplay(f"export {cfg.name}") as stages:
        stages("weights")
        var, vae, src = load_models(cfg, a.ckpt, a.vae_ckpt, a.random_init)
        stages("reuse check")             # until the exporter names its first stage
        res = export_artifacts(var, vae, src, a.out, ec, force=a.force, progress=stages)
    print(stages.summary())
    if res.reused:
        print(f"{a.out} is up to date (same model, weights and options; files verified): nothing exported")
        return 0
    man = res.manifest
    ext = man["external_data"]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"wrote {a.out}: {len(man['graphs'])} graphs, {ext['file']} {ext['bytes'] / 2**20:.1f} MiB "
          f"(parameters {ext['parameter_bytes'] / 2**20:.1f} MiB, referenced {ext['referenced_bytes'] / 2**20:.1f} MiB), "
          f"{time.time() - t0:.0f} s, peak RSS {peak_gb:.2f} GiB; weights: {src.describe()}")
    return 0

