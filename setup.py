"""Builds gaea_ext._C: CPU kernels always, CUDA kernels whenever nvcc and a CUDA torch exist.

The CUDA code is compiled even without a visible GPU so that a broken .cu file fails CI
on a GPU-less machine. Overrides: GAEA_CPU_ONLY=1, GAEA_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST.
"""
import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _resolve_cuda_home():
    # torch guesses CUDA_HOME from nvcc's location, which is wrong when nvcc is a wrapper on
    # PATH (e.g. /usr/local/bin/nvcc gives /usr/local); prefer a root that has the headers.
    def ok(d):
        return d and os.path.isfile(os.path.join(d, "include", "cuda_runtime.h"))

    if ok(cpp_extension.CUDA_HOME):
        return
    for d in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if ok(d):
            cpp_extension.CUDA_HOME = d
            return


def _want_cuda():
    if _flag("GAEA_CPU_ONLY"):
        return False
    if _flag("GAEA_FORCE_CUDA"):
        if cpp_extension.CUDA_HOME is None:
            sys.exit("GAEA_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def _nvidia_wheel_includes():
    # torch's CUDA headers include cusparse.h/cublas_v2.h, which a bare toolkit may lack;
    # torch's own NVIDIA wheels ship them.
    dirs = []
    for site in sys.path:
        for sub in ("cu13", "cu12"):
            d = os.path.join(site, "nvidia", sub, "include")
            if os.path.isfile(os.path.join(d, "cusparse.h")) and d not in dirs:
                dirs.append(d)
    return dirs


def extension():
    _resolve_cuda_home()
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is an inline OpenMP loop; without the flag it silently runs on
    # one thread. It binds to the libgomp torch already loaded (same soname), not a second one.
    cxx = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    macros = [("GAEA_TORCH_VERSION", '"%s"' % torch.__version__.split("+")[0])]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "gaea_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
            define_macros=macros,
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    macros += [
        ("GAEA_WITH_CUDA", None),
        ("GAEA_CUDA_ARCHS", '"%s"' % archs),
        ("GAEA_CUDA_VERSION", '"%s"' % torch.version.cuda),
    ]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "gaea_ext._C",
        sources,
        include_dirs=_nvidia_wheel_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        define_macros=macros,
    )


setup(
    packages=find_packages(include=["gaea_ext", "gaea_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
