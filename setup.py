"""Build of the srd_ext C++/CUDA operators.

The CUDA kernels are compiled whenever nvcc and a CUDA build of torch are present; otherwise the
build is CPU-only. SRD_EXT_CUDA=1 forces the CUDA build (and fails without a toolkit), SRD_EXT_CUDA=0
forces CPU-only. TORCH_CUDA_ARCH_LIST picks the target GPUs; without it the build targets the
visible GPUs (torch's own detection) or, where none is visible, every architecture the installed
torch was built for, with PTX for the newest so that later GPUs can compile it at load time.
"""

import glob
import os

# torch infers the toolkit from `which nvcc`; where nvcc is only linked into /usr/local/bin that
# gives /usr/local, which has no libcudart. Prefer the conventional toolkit folder.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda/lib64"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch  # noqa: E402
except ImportError:  # an isolated build (plain `pip install .`) has no torch
    raise SystemExit(
        "srd_ext is compiled against the torch it will run with: install torch first, then "
        "build with `pip install --no-build-isolation .`"
    ) from None
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("SRD_EXT_CUDA", "auto").strip().lower()
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if flag in ("1", "true", "yes", "on"):
        if not available:
            raise RuntimeError(
                "SRD_EXT_CUDA=1 but no CUDA toolkit (nvcc) or no CUDA build of torch was found; "
                f"CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
            )
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    if flag != "auto":
        raise RuntimeError(f"SRD_EXT_CUDA must be 0, 1 or auto, got {flag!r}")
    return available


def default_cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST for a build without one: None where torch detects the visible GPUs, else
    the architectures of torch's own kernels (e.g. "7.5;8.0;8.6;9.0;10.0;12.0+PTX")."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return None
    archs = sorted({int(a[3:]) for a in torch.cuda.get_arch_list() if a.startswith("sm_") and a[3:].isdigit()})
    if not archs:
        raise RuntimeError("no GPU is visible and torch reports no CUDA architectures; set TORCH_CUDA_ARCH_LIST")
    return ";".join(f"{a // 10}.{a % 10}" for a in archs) + "+PTX"


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # torch adds -std=c++20, which ATen needs
    extra = {"cxx": cxx}
    cuda = want_cuda()
    if cuda:
        arch_list = default_cuda_arch_list()
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    common = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args=extra, extra_link_args=["-fopenmp"])
    if cuda:
        return [CUDAExtension("srd_ext._C", sources, define_macros=[("SRD_EXT_WITH_CUDA", "1")], **common)]
    return [CppExtension("srd_ext._C", sources, **common)]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
