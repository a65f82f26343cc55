"""The black-box boundary both sides share: what a teacher answers and how it travels.

The response kinds (:mod:`.responses`), the wire protocol (:mod:`.protocol`), the checks
every answer passes (:mod:`.validate`), the backend interface and its errors (:mod:`.base`)
and the in-process backend (:mod:`.local`). The provider's side (server, quotas, keys,
metrics) is :mod:`b2kd.provider`; the edge's (client, ledger, cache, budget) :mod:`b2kd.edge`.
"""

from b2kd.blackbox.base import (
    Backend,
    BackendAnswer,
    BlackBoxError,
    BudgetExceeded,
    Provider,
    QuotaExceeded,
    Refused,
    TeacherRefused,
    TeacherUnavailable,
)
from b2kd.blackbox.local import LocalBackend
from b2kd.blackbox.responses import (
    ResponseKind,
    ResponseKindError,
    centre,
    teacher_logits,
    to_probs,
    top1,
)

__all__ = [
    "Backend",
    "BackendAnswer",
    "BlackBoxError",
    "BudgetExceeded",
    "LocalBackend",
    "Provider",
    "QuotaExceeded",
    "Refused",
    "ResponseKind",
    "ResponseKindError",
    "TeacherRefused",
    "TeacherUnavailable",
    "centre",
    "teacher_logits",
    "to_probs",
    "top1",
]
