"""Full compilation of Triton kernels to sm_90 cubins without a GPU, for the slow tier.

The interpreter accepts code the real compiler rejects (non-constexpr globals, loop-carried names changing shape)
and never checks shared-memory limits; compiling each kernel configuration catches both on a CPU-only machine.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_compiles_for_h100(script: str, *args: str) -> None:
    """Run ``script`` (it compiles kernels for sm_90 and prints "compiled") in a fresh process without the
    interpreter, and fail with its error output unless it succeeds."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "compiled"
