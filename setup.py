"""Build of the srd_ext C++/CUDA operators.

The CUDA kernels are compiled whenever nvcc and a CUDA build of torch are present; otherwise the
build is CPU-only. SRD_EXT_CUDA=1 forces the CUDA build (and fails without a toolkit), SRD_EXT_CUDA=0
forces CPU-only. TORCH_CUDA_ARCH_LIST picks the target GPUs (default here: 9.0, Hopper).
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
    raise SystemExit("srd_ext is compiled against the torch it will run with: install torch first, then "
                     "build with `pip install --no-build-isolation .`") from None
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


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # torch adds -std=c++20, which ATen needs
    extra = {"cxx": cxx}
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        return [CUDAExtension("srd_ext._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
                              extra_compile_args=extra, extra_link_args=["-fopenmp"],
                              define_macros=[("SRD_EXT_WITH_CUDA", "1")])]
    return [CppExtension("srd_ext._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
                         extra_compile_args=extra, extra_link_args=["-fopenmp"])]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
