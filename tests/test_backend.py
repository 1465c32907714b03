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
    # every reason: the device's and the op's own (its 2-D check), not the first kind alone
    assert "toy" in msg and "TRITON_INTERPRET" in msg and "needs 2-D input" in msg
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
    with pytest.raises(ValueError, match=r"unknown backend 'bogus' \(from \$MIMFAST_BACKEND\)"):
        op(torch.zeros(2, 2))
    monkeypatch.setenv(backend.ENV_VAR, " Triton\n")
    assert op(torch.zeros(2, 2))[0] == "triton"


def test_use_blocks_of_interleaved_threads_leave_their_own_entry(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    a, b = backend.use("triton"), backend.use("torch")
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # the first block closes while the second is still open
    assert backend.requested_backend() == "torch"
    b.__exit__(None, None, None)
    assert backend.requested_backend() == "auto"


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


def _info(**env):
    env = {k: v for k, v in os.environ.items() if k != backend.ENV_VAR} | env
    out = subprocess.run([sys.executable, "-m", "mimfast.info"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return {line.split()[0]: line.split(None, 2)[2] for line in out.stdout.splitlines()
            if line.startswith(("random_masking ", "requested "))}


@pytest.mark.skipif("torch.cuda.is_available()")
def test_info_shows_the_backend_each_op_would_use():
    assert _info(TRITON_INTERPRET="0")["random_masking"] == "torch"
    # the requested backend, or why it cannot run
    assert _info(TRITON_INTERPRET="1", MIMFAST_BACKEND="triton")["random_masking"] == "triton"
    assert "TRITON_INTERPRET=1" in _info(TRITON_INTERPRET="0", MIMFAST_BACKEND="triton")["random_masking"]
    assert _info(MIMFAST_BACKEND="cuda")["random_masking"] == "- (no cuda implementation)"
    bad = _info(MIMFAST_BACKEND="foo")
    assert "'foo' (from $MIMFAST_BACKEND)" in bad["requested"] and bad["random_masking"] == "torch"


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
