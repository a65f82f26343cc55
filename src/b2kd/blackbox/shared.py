"""Responses paid for once and reused by several runs (budget sweeps of `b2kd bench`).

``SharedCache`` wraps a backend with a second ledger shared between runs: an
image already answered there is served from it, any other is sent to the
teacher and recorded there. Each run still records every response it uses in
its own ledger, with the bytes the original query cost, so a run's own
accounting (queries, budget, MB) is what it would have paid alone, while the
shared ledger holds what was actually paid for the whole sweep.
"""

from __future__ import annotations

import torch

from b2kd.blackbox.base import Backend, BackendAnswer
from b2kd.blackbox.ledger import Ledger, image_hashes


class SharedCache:
    def __init__(self, backend: Backend, ledger: Ledger, stage: str = "shared"):
        self.backend = backend
        self.ledger = ledger
        self.stage = stage
        self.kind = backend.kind
        self.num_classes = backend.num_classes
        self.image_shape = backend.image_shape

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model  # only a local backend has one (white-box methods)

    def infer(self, images: torch.Tensor) -> BackendAnswer:
        hashes = image_hashes(images)
        kind = str(self.kind)
        known = self.ledger.lookup_rows(hashes, kind)
        new = [i for i, h in enumerate(hashes) if h not in known]
        if new:
            answer = self.backend.infer(images[new])
            new_hashes = [hashes[i] for i in new]
            self.ledger.record(new_hashes, images[new], answer.responses, kind, answer.bytes_sent,
                               answer.bytes_received, self.stage)
            for j, h in enumerate(new_hashes):
                known[h] = (answer.responses[j].float().cpu(), answer.bytes_sent[j], answer.bytes_received[j])
        rows = [known[h] for h in hashes]
        return BackendAnswer(
            responses=torch.stack([r for r, _, _ in rows]),
            bytes_sent=[s for _, s, _ in rows],
            bytes_received=[r for _, _, r in rows],
        )
