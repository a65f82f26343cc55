"""Responses paid for once and reused by several runs (budget sweeps of `b2kd bench`).

``SharedCache`` wraps a backend with a second ledger shared between runs: an
image already answered there is served from it, any other is sent to the
teacher and recorded there. Each run still records every response it uses in
its own ledger, with the bytes the original query cost, so a run's own
accounting (queries, budget, MB) is what it would have paid alone, while the
shared ledger holds what was actually paid for the whole sweep.

Several runs may use one shared ledger at the same time (``b2kd bench --ray`` runs
cells in parallel, on several processes or machines): looking an image up, paying
for it and recording it happen under one file lock beside the ledger, so an image
is paid once whichever run asks first, and the others read its answer.

Like a run's ledger, the shared one records the provider of each answer (URL, model name and
version, response kind; :class:`b2kd.blackbox.base.Provider`): a shared ledger holding answers
from another teacher than the one now queried is refused with one line before anything is
sent, unless mixing is allowed (``teacher.allow_mixed_providers``). A shared ledger written
before providers were recorded migrates when opened; its answers' provider is unknown and
not counted as another's.
"""

from __future__ import annotations

import torch
from filelock import FileLock, Timeout

from b2kd.blackbox.base import Backend, BackendAnswer, TeacherUnavailable
from b2kd.edge.ledger import Ledger, image_hashes
from b2kd.edge.teacher import provider_of, refuse_mixed


class SharedCache:
    def __init__(self, backend: Backend, ledger: Ledger, stage: str = "shared",
                 lock_timeout_s: float = 3600.0, allow_mixed_providers: bool = False):
        """``allow_mixed_providers`` (teacher.allow_mixed_providers) lets ``ledger`` hold, and
        serve, answers from another provider than ``backend``'s."""
        self.backend = backend
        self.ledger = ledger
        self.provider = provider_of(backend)  # who answers; recorded with every answer paid
        self.allow_mixed_providers = allow_mixed_providers
        if self.provider is not None and not allow_mixed_providers:
            refuse_mixed(ledger, self.provider, "shared ledger (teacher.shared_cache)",
                         "use another teacher.shared_cache")
        # held while one run pays: a wait past the timeout means a run is stuck, not busy
        self._lock = FileLock(f"{ledger.path}.lock", timeout=lock_timeout_s)
        self.stage = stage
        self.kind = backend.kind
        self.num_classes = backend.num_classes
        self.image_shape = backend.image_shape
        self.embedding_dim = getattr(backend, "embedding_dim", None)

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model  # only a local backend has one (white-box methods)

    def infer(self, images: torch.Tensor) -> BackendAnswer:
        hashes = image_hashes(images)
        kind = str(self.kind)
        try:
            with self._lock:  # another run may be paying for the same images right now
                known = self.ledger.lookup_rows(hashes, kind)
                new = [i for i, h in enumerate(hashes) if h not in known]
                if new:
                    answer = self.backend.infer(images[new])
                    new_hashes = [hashes[i] for i in new]
                    self.ledger.record(new_hashes, images[new], answer.responses, kind, answer.bytes_sent,
                                       answer.bytes_received, self.stage, answer.embeddings, self.provider)
                    for j, h in enumerate(new_hashes):
                        known[h] = (answer.responses[j].float().cpu(), answer.bytes_sent[j],
                                    answer.bytes_received[j])
                embeddings = None
                if self.kind.embedding:  # read under the lock too: another run may be writing
                    found = self.ledger.lookup_embeddings(hashes, kind)
                    embeddings = torch.stack([found[h] for h in hashes])
        except Timeout:
            raise TeacherUnavailable(f"the shared ledger {self.ledger.path} stayed locked by another run for"
                                     f" {self._lock.timeout:.0f} s; is a run stuck?") from None
        rows = [known[h] for h in hashes]
        return BackendAnswer(
            responses=torch.stack([r for r, _, _ in rows]),
            bytes_sent=[s for _, s, _ in rows],
            bytes_received=[r for _, _, r in rows],
            embeddings=embeddings,
        )
