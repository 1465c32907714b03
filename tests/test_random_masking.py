import pytest
import torch

from mimfast.ops import random_masking


@pytest.mark.parametrize("N,L,ratio", [(1, 196, 0.75), (3, 196, 0.0), (2, 1568, 0.9), (5, 7, 0.5), (2, 1, 0.99)],
                         ids=lambda v: str(v))
def test_noise_gives_argsort_semantics(N, L, ratio):
    noise = torch.rand(N, L)
    info = random_masking(N, L, ratio, noise=noise, backend="torch")
    K = int(L * (1 - ratio))
    order = sorted(range(L), key=lambda j: noise[0, j].item())
    assert info.ids_keep.shape == (N, K)
    assert info.ids_keep[0].tolist() == order[:K]
    assert info.ids_restore[0].tolist() == [order.index(j) for j in range(L)]
    expected_mask = torch.ones(N, L)
    expected_mask.scatter_(1, info.ids_keep, 0)
    assert torch.equal(info.mask, expected_mask)
    assert info.mask.sum(1).tolist() == [float(L - K)] * N


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 10, ratio)


def test_bad_noise_shape_and_nan():
    with pytest.raises(ValueError, match="shape"):
        random_masking(2, 10, 0.5, noise=torch.rand(2, 9))
    bad = torch.rand(2, 10)
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        random_masking(2, 10, 0.5, noise=bad)


def test_generator_reproducible():
    a = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(3))
    b = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(3))
    c = random_masking(4, 49, 0.75, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.ids_keep, c.ids_keep)
