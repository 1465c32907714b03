"""Linear probe: multinomial logistic regression on frozen, standardised features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mimfast.eval.knn import check_features

__all__ = ["linear_probe_accuracy", "fit_linear_probe"]


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-4,
                     max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit W [D, C], b [C] on features [N, D] standardised per dimension as the parameter-free BatchNorm in front
    of MAE's linear probe does it ((x - mean) / sqrt(var + 1e-6), biased variance of the training features) by
    full-batch L-BFGS in float64; deterministic. Returns (W, b, mean, std)."""
    check_features(features=features)
    x = features.double()
    # eps inside the root, as BatchNorm1d(affine=False, eps=1e-6): a dimension almost constant on the training
    # features is scaled by at most 1e3, not 1e6, so a small shift of it on test features cannot swamp the others
    mean, std = x.mean(0), (x.var(0, unbiased=False) + 1e-6).sqrt()
    x = (x - mean) / std
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, labels) + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach(), mean, std


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                          test_labels: torch.Tensor, l2: float = 1e-4) -> float:
    """Test accuracy of a logistic-regression probe fitted on the training features (NaN without test samples)."""
    if len(test_labels) == 0:
        return float("nan")
    check_features(train_features=train_features, test_features=test_features)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    W, b, mean, std = fit_linear_probe(train_features, train_labels, num_classes, l2)
    pred = (((test_features.double() - mean) / std) @ W + b).argmax(1)
    return float((pred == test_labels).double().mean()) if len(test_labels) else float("nan")
