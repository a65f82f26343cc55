"""The edge's side of the API: what the device pays for and keeps.

:class:`BlackBoxTeacher` (budget, cache, every query through the ledger), the
:class:`Ledger` (the record of every paid query, and the privacy audit's evidence),
:class:`HTTPTeacher` (the client of any Open Inference Protocol server), the shared
response cache of a bench (:mod:`.cache`) and the stated input preprocessing (:mod:`.preprocess`).
"""

from b2kd.edge.client import HTTPTeacher
from b2kd.edge.ledger import Ledger, image_hashes
from b2kd.edge.teacher import BlackBoxTeacher

__all__ = ["BlackBoxTeacher", "HTTPTeacher", "Ledger", "image_hashes"]
