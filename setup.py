"""Install gradsparse: ``pip install torch==2.13.0 && pip install --no-build-isolation -e .``.

torch is deliberately not an install requirement: an unpinned torch resolved by
pip pulls the newest CUDA build (gigabytes). Install the torch you want first;
the C++ extension (csrc/) is built against it, hence ``--no-build-isolation``.

The extension is a CUDAExtension when torch has CUDA and nvcc is found, a
CppExtension otherwise. ``GRADSPARSE_NO_EXTENSION=1`` skips it (the package then
uses its pure-PyTorch kernels, with identical results). ``GRADSPARSE_SANITIZE=address,undefined``
builds the CPU kernels with those sanitizers (used by csrc/sanitize.sh).
"""

import glob
import os

from setuptools import find_packages, setup

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
    ext_modules, cmdclass = [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(
    name="gradsparse",
    version="0.1.0",
    description="Sparse gradient communication (top-k, threshold, Deep Gradient Compression) for PyTorch",
    packages=find_packages(include=["gradsparse", "gradsparse.*"]),
    python_requires=">=3.10",
    install_requires=["numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "matplotlib"],
                    "mpi": ["mpi4py", "openmpi"], "bench": ["tqdm", "matplotlib"],
                    # gradsparse.lightning and the Accelerate recipe (docs/integrations.md); tested versions
                    "integrations": ["lightning>=2.6", "accelerate>=1.15"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
