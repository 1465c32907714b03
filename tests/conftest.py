import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def interpret(request, monkeypatch):
    """Default tier: Triton kernels run through the interpreter on CPU tensors. GPU tier: compiled kernels.

    Triton fixes a kernel's mode when its module is first imported, so the two tiers run in separate processes
    (`make test` and `make test-gpu`)."""
    if request.node.get_closest_marker("gpu") is not None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA"))


@pytest.fixture(params=[False, True], ids=["channel_loops", "channel_sums"])
def channel_sums(request, monkeypatch):
    """Both ways the pixel-loss kernel may reduce per-channel statistics (kernels.pixel_loss.CHANNEL_SUMS)."""
    import mimfast.kernels.pixel_loss as kernels

    monkeypatch.setattr(kernels, "CHANNEL_SUMS", request.param)
    return request.param


@pytest.fixture(params=[False, True], ids=["value_order", "transposed"])
def gather_transpose(request, monkeypatch):
    """Both ways the gather kernels may read an image (kernels.gather_patches.TRANSPOSE: value by value in patchify
    order, or whole patches in the image's order transposed in registers, where Triton has tl.gather)."""
    import mimfast.kernels.gather_patches as kernels

    monkeypatch.setattr(kernels, "TRANSPOSE", request.param)
    return request.param


@pytest.fixture(params=[False, True], ids=["value_order", "transposed"])
def loss_transpose(request, monkeypatch):
    """Both ways the pixel-loss kernel may read its targets (kernels.pixel_loss.TRANSPOSE)."""
    import mimfast.kernels.pixel_loss as kernels

    monkeypatch.setattr(kernels, "TRANSPOSE", request.param)
    return request.param
