"""Child side of run_under_real_trt: load the real bindings of one TensorRT version (stub
libraries preloaded by path, so their SONAMEs satisfy the extension module), make `tensorrt` the
strict fake over them, fake a CUDA device, run the target, write its JSON result."""
import ctypes
import importlib
import json
import os
import sys


def load(version: str, gpu: str, cc: str):
    from tests.trt_real import fake_cuda, sim
    from tests.trt_real.setup_bindings import BINDINGS, LIBS, ensure, soname_major
    site, lib = ensure(version)
    for name in LIBS.values():
        ctypes.CDLL(os.path.join(lib, f"{name}.so.{soname_major(version)}"), mode=ctypes.RTLD_GLOBAL)
    sys.path.insert(0, site)
    import tensorrt_bindings as real
    assert real.__version__ == BINDINGS[version][1], real.__version__
    sys.modules["tensorrt"] = sim.strict_module(real)
    sim.MACHINE.gpu, sim.MACHINE.cc = gpu, tuple(int(x) for x in cc.split("."))
    fake_cuda.install(setattr, gpu=gpu, cc=sim.MACHINE.cc)
    return real


def main(argv):
    version, target, args, out, gpu, cc = argv
    load(version, gpu, cc)
    mod, fn = target.split(":")
    result = getattr(importlib.import_module(mod), fn)(*json.loads(args))
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
