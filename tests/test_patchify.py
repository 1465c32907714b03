import pytest
import torch

from mimfast.ops import patchify, unpatchify


def _patchify_loops(imgs: torch.Tensor, p: int) -> torch.Tensor:
    N, C, H, W = imgs.shape
    rows = []
    for i in range(H // p):
        for j in range(W // p):
            vals = [imgs[:, c, i * p + r, j * p + s] for r in range(p) for s in range(p) for c in range(C)]
            rows.append(torch.stack(vals, dim=1))
    return torch.stack(rows, dim=1)


def _patchify_video_loops(v: torch.Tensor, pt: int, p: int) -> torch.Tensor:
    N, C, T, H, W = v.shape
    rows = []
    for t in range(T // pt):
        for i in range(H // p):
            for j in range(W // p):
                vals = [v[:, c, t * pt + a, i * p + r, j * p + s]
                        for a in range(pt) for r in range(p) for s in range(p) for c in range(C)]
                rows.append(torch.stack(vals, dim=1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("N,C,H,W,p", [(2, 3, 8, 12, 4), (1, 1, 6, 6, 3), (3, 2, 10, 5, 5)], ids=str)
def test_patchify_order_and_roundtrip(N, C, H, W, p):
    imgs = torch.randn(N, C, H, W, dtype=torch.float64)
    x = patchify(imgs, p)
    assert torch.equal(x, _patchify_loops(imgs, p))
    assert torch.equal(unpatchify(x, p, (H // p, W // p), C), imgs)


def test_patchify_noncontiguous():
    imgs = torch.randn(2, 8, 8, 3).permute(0, 3, 1, 2)
    assert torch.equal(patchify(imgs, 4), _patchify_loops(imgs.contiguous(), 4))


@pytest.mark.parametrize("N,C,T,H,W,pt,p", [(2, 3, 4, 4, 8, 2, 2), (1, 2, 3, 6, 6, 1, 3)], ids=str)
def test_patchify_video_order_and_roundtrip(N, C, T, H, W, pt, p):
    v = torch.randn(N, C, T, H, W, dtype=torch.float64)
    x = patchify(v, p, tubelet_size=pt)
    assert torch.equal(x, _patchify_video_loops(v, pt, p))
    assert torch.equal(unpatchify(x, p, (T // pt, H // p, W // p), C, tubelet_size=pt), v)


def test_patchify_errors():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        patchify(torch.zeros(1, 3, 10, 8), 4)
    with pytest.raises(TypeError, match="floating-point"):
        patchify(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        patchify(torch.zeros(3, 8, 8), 4)
    with pytest.raises(ValueError, match="tubelet size"):
        patchify(torch.zeros(1, 3, 3, 8, 8), 4, tubelet_size=2)
    with pytest.raises(ValueError, match="does not match"):
        unpatchify(torch.zeros(1, 4, 47), 4, (2, 2), 3)
