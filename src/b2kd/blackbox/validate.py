"""Every answer is checked before it is recorded, cached or trained on.

An answer that crosses the network is untrusted: a server may send NaN, inf,
logits where probabilities were promised, or rows that are no distribution at
all. Each response kind has a form its API-form rows must fit (b2kd.blackbox.responses):

- ``soft``: finite, in [0, 1], each row summing to 1 within ``SUM_TOLERANCE``;
- ``rounded:d``: the same, within what rounding K values to d decimals can move the sum;
- ``topk:k``: exactly k finite values in [0, 1] per row (NaN elsewhere), summing to at most 1;
- ``hard``: one-hot rows (labels in range).

The first row that does not fit is named in the error, with what it holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from b2kd.blackbox.base import BlackBoxError
from b2kd.blackbox.responses import ResponseKind

#: How far a row of probabilities may sum from 1 (FP16 probabilities of 10 classes stay well within).
SUM_TOLERANCE = 0.01


class InvalidAnswer(BlackBoxError):
    """An answer that is not what its response kind promises; nothing of it is recorded."""


def _row(api: torch.Tensor, i: int) -> str:
    values = ", ".join(f"{v:.4g}" for v in api[i, :10].tolist())
    return f"row {i} is [{values}{', ...' if api.shape[1] > 10 else ''}]"


def _checks(api: torch.Tensor, kind: ResponseKind) -> list[tuple[torch.Tensor, Callable[[int], str]]]:
    """(bad-row mask, why row i is bad) for each rule of ``kind``, in the order they are told."""
    known = ~torch.isnan(api)
    values = torch.where(known, api, torch.zeros_like(api))
    sums = values.double().sum(1)
    checks: list[tuple[torch.Tensor, Callable[[int], str]]] = []
    if kind.name == "topk":
        k = min(kind.param, api.shape[1])
        checks.append((known.sum(1) != k,
                       lambda i: f"a top-{k} answer holds {k} values (NaN or a repeated index)"))
    else:
        checks.append(((~known).any(1), lambda i: "NaN is not a probability"))
    checks.append(((~torch.isfinite(values)).any(1), lambda i: "infinite values"))
    checks.append((((values < 0) | (values > 1)).any(1), lambda i: "probabilities lie in [0, 1]"))
    if kind.is_hard:
        not_one_hot = ((values != 0) & (values != 1)).any(1) | (sums != 1)
        checks.append((not_one_hot, lambda i: "a label answer is one-hot"))
    elif kind.name == "topk":
        checks.append((sums > 1 + SUM_TOLERANCE,
                       lambda i: f"top-k probabilities sum to {float(sums[i]):.4g} > 1"))
    else:  # rounding K values to d decimals moves their sum by up to K x 0.5 x 10^-d
        slack = SUM_TOLERANCE + (api.shape[1] * 0.5 * 10.0 ** -kind.param if kind.name == "rounded" else 0)
        checks.append(((sums - 1).abs() > slack,
                       lambda i: f"probabilities sum to 1 (within {slack:.3g}),"
                                 f" this row to {float(sums[i]):.4g}"))
    return checks


def invalid_rows(api: torch.Tensor, kind: ResponseKind | str) -> torch.Tensor:
    """A boolean mask (N,) of the API-form rows (N, K) that do not fit ``kind``."""
    api = api.detach().float().cpu()
    bad = torch.zeros(len(api), dtype=torch.bool)
    for mask, _ in _checks(api, ResponseKind.parse(kind)):
        bad |= mask
    return bad


def problem(api: torch.Tensor, kind: ResponseKind | str) -> str | None:
    """Why API-form rows (N, K) do not fit ``kind`` (the first bad row), or None when they do."""
    api = api.detach().float().cpu()
    if api.dim() != 2 or api.shape[1] < 2:
        return f"answers must be rows of K >= 2 values, got shape {tuple(api.shape)}"
    for mask, why in _checks(api, ResponseKind.parse(kind)):
        if mask.any():
            i = int(mask.nonzero()[0])
            return f"{_row(api, i)}: {why(i)}"
    return None


def check(api: torch.Tensor, kind: ResponseKind | str, source: str, hint: str = "") -> None:
    """Raise :class:`InvalidAnswer` naming ``source`` when the rows do not fit ``kind``."""
    why = problem(api, kind)
    if why is not None:
        raise InvalidAnswer(f"{source} sent an invalid '{ResponseKind.parse(kind)}' answer: {why};"
                            f" nothing of it was recorded{hint}")


def softmax_of_logits(logits: torch.Tensor, source: str) -> torch.Tensor:
    """Probabilities from a server that states it answers logits (``teacher.output=logits``).

    Logits must be finite, and a batch whose every row already fits a probability
    distribution is refused: it is probabilities, and its softmax would be near
    uniform, a silently useless answer.
    """
    logits = logits.detach().float().cpu()
    bad = (~torch.isfinite(logits)).any(1).nonzero()
    if len(bad):
        raise InvalidAnswer(f"{source} sent invalid logits: {_row(logits, int(bad[0]))}: logits are"
                            " finite; nothing of it was recorded")
    if problem(logits, "soft") is None:
        raise InvalidAnswer(f"{source} sent probabilities (every row in [0, 1], summing to 1) but"
                            " teacher.output is 'logits'; set teacher.output=probabilities")
    return torch.softmax(logits, dim=1)


#: The largest magnitude an embedding value may have: a penultimate activation is O(1-100);
#: anything past this is a broken or hostile answer, not a feature.
EMBEDDING_LIMIT = 1e6


def embedding_problem(embeddings: torch.Tensor | None, n: int, dim: int | None) -> str | None:
    """Why ``embeddings`` are not ``n`` finite vectors of ``dim`` values, or None when they are."""
    if embeddings is None:
        return "the answer has no embedding"
    if embeddings.dim() != 2 or len(embeddings) != n or (dim is not None and embeddings.shape[1] != dim):
        return f"embeddings must have shape ({n}, {dim if dim is not None else 'D'}), got {tuple(embeddings.shape)}"
    if embeddings.shape[1] < 1:
        return "an embedding holds at least one value"
    values = embeddings.detach().float().cpu()
    bad = ((~torch.isfinite(values)) | (values.abs() > EMBEDDING_LIMIT)).any(1).nonzero()
    if len(bad):
        return f"embedding {_row(values, int(bad[0]))}: values are finite and below {EMBEDDING_LIMIT:g} in size"
    return None


def check_embeddings(embeddings: torch.Tensor | None, n: int, dim: int | None, source: str) -> None:
    """Raise :class:`InvalidAnswer` naming ``source`` when the embeddings are not usable."""
    why = embedding_problem(embeddings, n, dim)
    if why is not None:
        raise InvalidAnswer(f"{source} sent an invalid embedding: {why}; nothing of it was recorded")
