"""Install gradsparse: ``pip install torch==2.13.0 && pip install -e .``.

torch is deliberately not an install requirement: an unpinned torch resolved by
pip pulls the newest CUDA build (gigabytes). Install the torch you want first.
"""

from setuptools import find_packages, setup

setup(
    name="gradsparse",
    version="0.1.0",
    description="Sparse gradient communication (top-k, threshold, Deep Gradient Compression) for PyTorch",
    packages=find_packages(include=["gradsparse", "gradsparse.*"]),
    python_requires=">=3.10",
    install_requires=["numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis"]},
)
