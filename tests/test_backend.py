import os
import subprocess
import sys

import pytest
import torch

from mimfast import backend
from mimfast.backend import BackendUnavailableError, Op


def _toy_op() -> Op:
    op = Op("toy")
    op.register("torch")(lambda x: ("torch", x))
    op.register("triton", reasons=lambda x: [] if x.dim() == 2 else [f"toy kernel needs 2-D input, got {x.dim()}-D"])(
        lambda x: ("triton", x)
    )
    return op


def test_lean_import():
    code = "import sys, mimfast, mimfast.ops; import torch; " \
           "assert 'triton' not in sys.modules, 'triton imported'; " \
           "assert not torch.cuda.is_initialized(), 'CUDA initialised'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    op = _toy_op()
    assert op(torch.zeros(2, 2))[0] == "torch"
    assert op.which(torch.zeros(2, 2)) == "torch"


def test_explicit_request_raises_with_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    op = _toy_op()
    with pytest.raises(BackendUnavailableError) as e:
        op(torch.zeros(2, 2, 2), backend="triton")
    msg = str(e.value)
    assert "toy" in msg and "TRITON_INTERPRET" in msg
    with pytest.raises(BackendUnavailableError, match="no cuda implementation"):
        op(torch.zeros(2, 2), backend="cuda")


def test_interpreter_lets_triton_run_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = _toy_op()
    assert op(torch.zeros(2, 2), backend="triton")[0] == "triton"
    with pytest.raises(BackendUnavailableError, match="2-D"):
        op(torch.zeros(2), backend="triton")


def test_env_var_and_context(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = _toy_op()
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    assert op(torch.zeros(2, 2))[0] == "triton"
    assert op(torch.zeros(2, 2), backend="torch")[0] == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    with backend.use("triton"):
        assert op(torch.zeros(2, 2))[0] == "triton"
    assert op(torch.zeros(2, 2))[0] == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        op(torch.zeros(2, 2))


@pytest.mark.skipif(not torch.backends.mps.is_available() and not torch.cuda.is_available(),
                    reason="needs a second device type")
def test_mixed_devices_rejected():
    other = "cuda" if torch.cuda.is_available() else "mps"
    op = _toy_op()
    with pytest.raises(BackendUnavailableError, match="different devices"):
        op.select("auto", torch.zeros(2, 2), torch.zeros(2, 2, device=other))


def test_mixed_devices_reason_without_gpu():
    reasons = backend.device_reasons([torch.device("cpu"), torch.device("meta")])
    assert reasons and "different devices" in reasons[0]


def test_info_runs():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "mimfast.info"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "random_masking" in out.stdout and "torch" in out.stdout


@pytest.mark.parametrize("triton_v,numpy_v,broken", [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                     ("3.7.1", "2.4.6", False), ("3.9.0", "2.4.0", False),
                                                     ("3.5.1+git1234", "2.5.0rc1", True)])
def test_interpreter_problem_names_the_versions(monkeypatch, triton_v, numpy_v, broken):
    import importlib.metadata

    versions = {"triton": triton_v, "numpy": numpy_v}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    monkeypatch.setattr(backend, "_INTERPRETER_PROBLEM", None)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    problem = backend.interpreter_problem()
    monkeypatch.setattr(backend, "_INTERPRETER_PROBLEM", None)  # no cached answer leaks into other tests
    assert bool(problem) == broken
    if broken:
        assert triton_v in problem[0] and numpy_v in problem[0] and "numpy<2.4" in problem[0]
