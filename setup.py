"""The C++/CUDA extension of gradsparse; metadata and dependencies are in pyproject.toml.

Install: ``pip install torch==2.13.0 setuptools wheel ninja && pip install --no-build-isolation -e .``.
The extension (csrc/) is built against the installed torch, hence ``--no-build-isolation``,
with ninja when it is on PATH (torch's BuildExtension falls back to plain setuptools otherwise).

The extension is a CUDAExtension when torch has CUDA and nvcc is found, a
CppExtension otherwise. ``GRADSPARSE_NO_EXTENSION=1`` skips it (the package then
uses its pure-PyTorch kernels, with identical results). ``GRADSPARSE_SANITIZE=address,undefined``
builds the CPU kernels with those sanitizers (used by csrc/sanitize.sh).
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("GRADSPARSE_NO_EXTENSION") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    headers = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/cpu/*.h") + glob.glob("csrc/cuda/*.cuh"))  # rebuild on change
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    link = ["-fopenmp"]
    sanitize = os.environ.get("GRADSPARSE_SANITIZE")
    if sanitize:
        cxx = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}", "-fno-sanitize-recover=all",
               "-fopenmp", "-std=c++17"]
        link = [f"-fsanitize={sanitize}", "-fopenmp"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources:
        ext = CUDAExtension("gradsparse._C", sources + cuda_sources, extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                            extra_link_args=link, depends=headers)
    else:
        ext = CppExtension("gradsparse._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
                           depends=headers)
    ext_modules, cmdclass = [ext], {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
