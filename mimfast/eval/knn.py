"""k-nearest-neighbour classification of frozen features (cosine similarity, temperature-weighted votes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_accuracy", "knn_predict", "check_features"]


def check_features(**features: torch.Tensor) -> None:
    """Raise ValueError naming every features tensor that holds a NaN or an infinity (a diverged encoder):
    a probe on them would report an accuracy that means nothing."""
    bad = [name for name, f in features.items() if f.numel() and not bool(torch.isfinite(f).all())]
    if bad:
        raise ValueError(f"{' and '.join(bad)} hold NaN or infinite values; the encoder that produced them diverged "
                         "or overflowed")


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: int = 0, chunk: int = 1024) -> torch.Tensor:
    """Labels [M] for test features [M, D] from train features [N, D] and labels [N] (int64, >= 0).

    Each of the k most cosine-similar training samples votes for its class with weight exp(similarity / T)
    (the weighted kNN of instance discrimination and DINO); ties go to the lower class index.

    Equivalent PyTorch::

        sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
        s, i = sim.topk(k); votes = zeros(M, C).scatter_add_(1, train_labels[i], (s / T).exp())
        pred = votes.argmax(1)
    """
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample")
    check_features(train_features=train_features, test_features=test_features)
    num_classes = max(num_classes, int(train_labels.max()) + 1)
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.double(), dim=1)
    out = []
    for start in range(0, test_features.shape[0], chunk):
        test = F.normalize(test_features[start:start + chunk].double(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Fraction of test samples whose kNN prediction equals their label."""
    pred = knn_predict(train_features, train_labels, test_features, k, temperature)
    return float((pred == test_labels).double().mean()) if len(test_labels) else float("nan")
