"""A label-free figure of a generator's quality, from teacher answers already paid for.

It is an Inception-Score-like number computed on the teacher's answers to the
generator's samples: exp(H(mean answer) - mean H(answer)), high when each
sample is answered confidently (low per-sample entropy) and the classes are
balanced over samples (high entropy of the mean). It lies in [1, K]. No label
and no test image is used, so it may choose a generator checkpoint.
"""

from __future__ import annotations

import torch


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def answer_score(probs: torch.Tensor) -> float:
    """exp(H(E[p]) - E[H(p)]) over the rows of ``probs`` (N, K); hard answers as one-hot rows."""
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError("answer_score needs a non-empty (N, K) tensor of probabilities")
    probs = probs.double()
    return float(torch.exp(entropy(probs.mean(0)) - entropy(probs).mean()))
