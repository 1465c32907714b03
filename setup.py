from setuptools import find_packages, setup

setup(
    name="mimfast",
    version="0.1.0",
    description="Fused Triton kernels and a training engine for masked image modeling and self-supervised vision",
    packages=find_packages(include=["mimfast", "mimfast.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "demo": ["scikit-learn", "matplotlib"],
        "bench": ["pytest-benchmark", "nvtx"],
        "dev": ["pytest", "pytest-benchmark", "ruff", "scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["mimfast=mimfast.cli:main"]},
)
