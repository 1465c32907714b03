"""Evaluation of frozen encoders: weighted kNN and a logistic-regression linear probe."""

from mimfast.eval.knn import knn_accuracy, knn_predict
from mimfast.eval.linear_probe import fit_linear_probe, linear_probe_accuracy

__all__ = ["fit_linear_probe", "knn_accuracy", "knn_predict", "linear_probe_accuracy"]
