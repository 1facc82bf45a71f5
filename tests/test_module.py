import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, fbeta_score

from lorahpo.module import class_weights, make_metrics

Y_TRUE = [0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0]
Y_PRED = [0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0]
M_TRUE = [0, 1, 2, 2, 1, 0, 2, 1, 0, 2]
M_PRED = [0, 2, 2, 1, 1, 0, 2, 0, 0, 2]


def _compute(num_labels: int, pred: list[int], true: list[int]) -> dict[str, float]:
    m = make_metrics(num_labels)
    m.update(torch.tensor(pred), torch.tensor(true))
    return {f"val_{k}": v.item() for k, v in m.compute().items()}


def test_binary_metrics_match_sklearn() -> None:
    got = _compute(2, Y_PRED, Y_TRUE)
    assert got["val_accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    assert got["val_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))
    assert got["val_fbeta"] == pytest.approx(fbeta_score(Y_TRUE, Y_PRED, beta=3))  # positive class
    # by hand: tp=3, fp=2, fn=2 -> P=R=0.6 -> F3 = 0.6
    assert got["val_fbeta"] == pytest.approx(0.6)


def test_multiclass_metrics_match_sklearn() -> None:
    got = _compute(3, M_PRED, M_TRUE)
    assert got["val_accuracy"] == pytest.approx(accuracy_score(M_TRUE, M_PRED))
    assert got["val_f1"] == pytest.approx(f1_score(M_TRUE, M_PRED, average="macro"))
    assert got["val_fbeta"] == pytest.approx(fbeta_score(M_TRUE, M_PRED, beta=3, average="macro"))


def test_class_weights() -> None:
    assert class_weights([0, 1, 0], 2, 7.0).tolist() == [1.0, 7.0]
    w = class_weights([0, 0, 0, 0, 1, 1, 2, 2], 3, 1.0)
    assert w.mean().item() == pytest.approx(1.0)
    assert w[1].item() == pytest.approx(2 * w[0].item())
