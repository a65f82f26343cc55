"""The black-box boundary: everything that crosses from the edge to the cloud goes through here."""

from b2kd.blackbox.base import (
    Backend,
    BackendAnswer,
    BlackBoxError,
    BudgetExceeded,
    QuotaExceeded,
    TeacherRefused,
    TeacherUnavailable,
)
from b2kd.blackbox.http import HTTPTeacher
from b2kd.blackbox.ledger import Ledger, image_hashes
from b2kd.blackbox.local import LocalBackend
from b2kd.blackbox.responses import (
    ResponseKind,
    ResponseKindError,
    centre,
    teacher_logits,
    to_probs,
    top1,
)
from b2kd.blackbox.teacher import BlackBoxTeacher

__all__ = [
    "Backend",
    "BackendAnswer",
    "BlackBoxError",
    "BlackBoxTeacher",
    "BudgetExceeded",
    "HTTPTeacher",
    "Ledger",
    "LocalBackend",
    "QuotaExceeded",
    "ResponseKind",
    "ResponseKindError",
    "TeacherRefused",
    "TeacherUnavailable",
    "centre",
    "image_hashes",
    "teacher_logits",
    "to_probs",
    "top1",
]
