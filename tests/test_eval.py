"""kNN and linear-probe evaluation of frozen features."""

import math

import pytest
import torch

from mimfast.eval import fit_linear_probe, knn_accuracy, knn_predict, linear_probe_accuracy


def _clusters(n_per_class, classes, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_knn_matches_a_loop_over_test_samples():
    train_x, train_y = _clusters(20, 4, 8, 2.0, 0)
    test_x, _ = _clusters(5, 4, 8, 2.0, 1)
    k, T = 7, 0.1
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=T, chunk=3)
    for i in range(len(test_x)):
        sims = [float(torch.dot(test_x[i].double(), t.double()) / (test_x[i].double().norm() * t.double().norm()))
                for t in train_x]
        top = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * 4
        for j in top:
            votes[int(train_y[j])] += math.exp(sims[j] / T)
        assert int(pred[i]) == max(range(4), key=lambda c: (votes[c], -c))


def test_probes_separate_clusters_and_not_noise():
    train_x, train_y = _clusters(40, 5, 16, 1.0, 0)
    test_x, test_y = _clusters(20, 5, 16, 1.0, 0)  # same centres (same seed), fresh draws below
    test_x = test_x + 0.5 * torch.randn_like(test_x)
    assert knn_accuracy(train_x, train_y, test_x, test_y) > 0.95
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) > 0.95
    noise_train, noise_test = torch.randn(200, 16), torch.randn(100, 16)
    labels_train, labels_test = torch.randint(0, 5, (200,)), torch.randint(0, 5, (100,))
    assert knn_accuracy(noise_train, labels_train, noise_test, labels_test) < 0.45
    assert linear_probe_accuracy(noise_train, labels_train, noise_test, labels_test) < 0.45


def test_linear_probe_is_deterministic_and_standardises():
    x, y = _clusters(30, 3, 6, 1.0, 2)
    W1, b1, mean, std = fit_linear_probe(x, y, 3)
    W2, b2, _, _ = fit_linear_probe(x, y, 3)
    assert torch.equal(W1, W2) and torch.equal(b1, b2)
    assert torch.allclose(mean, x.double().mean(0))
    assert torch.allclose(std, (x.double().var(0, unbiased=False) + 1e-6).sqrt())  # BatchNorm1d(eps=1e-6)
    # a scaled copy of the features is the same problem after standardisation
    W3, b3, _, _ = fit_linear_probe(x * 1000 + 5, y, 3)
    assert torch.allclose(W1, W3, atol=1e-5) and torch.allclose(b1, b3, atol=1e-5)


def test_linear_probe_keeps_a_dead_feature_from_swamping_the_others():
    # a dimension constant to 1e-8 on the training features and shifted by 0.1 on the test features: scaled by
    # 1 / sqrt(var + 1e-6) (at most 1e3) it moves the logits a little; scaled by 1 / max(std, 1e-6) it reached 1e5
    feats, labels = _clusters(80, 4, 8, 1.0, 0)
    train = torch.arange(len(labels)) % 4 != 0
    x, y, xt, yt = feats[train], labels[train], feats[~train], labels[~train]
    clean = linear_probe_accuracy(x, y, xt, yt)
    dead = 1e-8 * torch.randn(len(y), 1, generator=torch.Generator().manual_seed(3))
    shifted = 0.1 + 1e-8 * torch.randn(len(yt), 1, generator=torch.Generator().manual_seed(4))
    assert clean > 0.9
    assert linear_probe_accuracy(torch.cat([x, dead], 1), y, torch.cat([xt, shifted], 1), yt) == clean


def test_probes_refuse_features_that_are_not_finite():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="test_features hold NaN"):
        knn_accuracy(x, y, bad, y)
    with pytest.raises(ValueError, match="train_features hold NaN"):
        linear_probe_accuracy(bad, y, x, y)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="features hold NaN or infinite"):
        fit_linear_probe(bad, y, 2)
