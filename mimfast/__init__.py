"""mimfast: fused kernels and a training engine for masked image modeling and self-supervised vision.

Importing the package imports neither triton nor initialises CUDA; kernels load on first use.
"""

__version__ = "0.1.0"

from mimfast import backend, ops  # noqa: E402

__all__ = ["__version__", "backend", "ops"]
