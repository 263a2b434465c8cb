"""Reference values for the alarm's math, computed apart from stages.common.alarm.calibration:
scipy's softmax / log_softmax, scikit-learn's log_loss, and an ECE written as its definition
reads (a loop over the bins). A test compares the code under test with these, never with itself.
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, logsumexp, softmax as scipy_softmax
from sklearn.metrics import log_loss


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    return scipy_softmax(np.asarray(logits, np.float64) / temperature, axis=1)


def log_odds(logits, temperature: float, column: int) -> np.ndarray:
    """log(p / (1 - p)) of one class, from scipy's log-probabilities: log p - log(the others' p
    summed), finite where p itself rounds to 1.0."""
    logp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return logp[:, column] - logsumexp(np.delete(logp, column, axis=1), axis=1)


def nll(logits, targets, temperature: float) -> float:
    """Mean of -log p(target) from scipy's log_softmax (exact where p underflows; scikit-learn's
    log_loss agrees where p stays above its clip at float64's eps, 2.2e-16)."""
    logp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(logp)), np.asarray(targets)].mean())


def log_loss_nll(logits, targets, temperature: float) -> float:
    """scikit-learn's log loss of the tempered softmax."""
    probs = softmax(logits, temperature)
    return float(log_loss(targets, probs, labels=list(range(probs.shape[1]))))


def ece(probs, targets, bins: int = 15) -> float:
    """Sum over the bins (k/bins, (k+1)/bins] of |accuracy - mean confidence| x the bin's share."""
    probs = np.asarray(probs, np.float64)
    confidence, right = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(targets)
    total = 0.0
    for k in range(bins):
        inside = (confidence > k / bins) & (confidence <= (k + 1) / bins)
        if k == 0:
            inside |= confidence == 0
        if inside.any():
            total += abs(right[inside].mean() - confidence[inside].mean()) * inside.sum()
    return total / len(probs)
