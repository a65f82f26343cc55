"""The query ledger: an SQLite record of every image sent to the teacher.

One row per paid query: the image's hash, the bytes that travelled each way,
the response in API form, the teacher's embedding for a ``+embedding`` kind
(a gray-box answer) and, unless switched off, the image itself. The
ledger doubles as the response cache (a repeated image costs nothing) and as
the evidence that no private image ever left the device.

Only valid answers enter it (:mod:`b2kd.blackbox.validate`), and a ledger that
holds invalid ones (written by an older b2kd, or edited) refuses to serve them:
``b2kd ledger clean RUN`` removes them, to be paid again. Queries of evaluation
stages (``fidelity``: test images paid for to measure a served teacher) are
counted apart: they spend no query budget and are not in :meth:`Ledger.totals`.

Each answer names the provider that gave it (table ``providers``: URL, model name
and version, response kind; NULL in rows written before providers were recorded),
so a run can refuse to mix two teachers' answers. Answers that arrived and were
refused (malformed, invalid, too large) are never stored as responses; table
``refused`` keeps their count and bytes, so a report shows them beside what was paid.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Self

import numpy as np
import torch

from b2kd.blackbox.base import BlackBoxError, Provider, Refused
from b2kd.blackbox.responses import ResponseKind
from b2kd.blackbox.validate import InvalidAnswer, embedding_problem, invalid_rows, problem
from b2kd.core.sqlite_lock import while_locked

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT NOT NULL,
    kind TEXT NOT NULL,
    bytes_sent INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    response BLOB NOT NULL,
    image BLOB,
    shape TEXT NOT NULL,
    stage TEXT NOT NULL,
    created REAL NOT NULL,
    embedding BLOB,
    UNIQUE (hash, kind)
);
CREATE TABLE IF NOT EXISTS providers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    response TEXT NOT NULL,
    UNIQUE (url, model, version, response)
);
CREATE TABLE IF NOT EXISTS refused (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    images INTEGER NOT NULL,
    bytes_sent INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    reason TEXT NOT NULL,
    stage TEXT NOT NULL,
    provider INTEGER REFERENCES providers (id),
    created REAL NOT NULL
);
"""

#: Stages whose queries measure rather than train: counted apart from the budget and the totals.
EVALUATION_STAGES = ("fidelity",)


def _floats(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy())


class PoisonedLedger(BlackBoxError):
    """A ledger holding answers that are no valid response (it will not serve them)."""


def image_hashes(images: torch.Tensor) -> list[str]:
    """sha256 of each uint8 image's shape and bytes: the identity of what is sent."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (what goes on the wire), got {images.dtype}")
    arr = np.ascontiguousarray(images.cpu().numpy())
    shape = "x".join(str(d) for d in arr.shape[1:]).encode()
    return [hashlib.sha256(shape + b":" + row.tobytes()).hexdigest() for row in arr]


class Ledger:
    """Append-only record of paid queries in ``path`` (created if missing)."""

    def __init__(self, path: str | Path, keep_images: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_images = keep_images
        self._db = sqlite3.connect(self.path, timeout=30)
        while_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        self._db.execute("PRAGMA synchronous=FULL")
        while_locked(lambda: self._db.executescript(SCHEMA))
        self._add_column("embedding", "BLOB")  # a ledger written before gray-box answers existed
        # written before providers were recorded: their answers' provider is unknown (NULL)
        self._add_column("provider", "INTEGER REFERENCES providers (id)")

    def _add_column(self, name: str, declaration: str) -> None:
        """Migrate an older ledger: add a column to ``queries`` unless it is there (another
        process opening the same file may have just added it)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(queries)")}
        if name in columns:
            return
        try:
            with self._db:
                self._db.execute(f"ALTER TABLE queries ADD COLUMN {name} {declaration}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lookup(self, hashes: list[str], kind: str) -> dict[str, torch.Tensor]:
        """Cached responses for the hashes already paid for with this response kind."""
        return {h: response for h, (response, _, _) in self.lookup_rows(hashes, kind).items()}

    def _select(self, hashes: list[str], kind: str, columns: str, where: str = ""):
        """Rows (hash, *columns) of this kind for the given hashes, 500 hashes a statement."""
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(
                f"SELECT hash, {columns} FROM queries WHERE kind = ? {where} AND hash IN ({marks})",
                [kind, *chunk],
            )

    def lookup_rows(self, hashes: list[str], kind: str) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Cached (response, bytes sent, bytes received) for the hashes already paid for with this kind."""
        found = {h: (_floats(blob), sent, received) for h, blob, sent, received
                 in self._select(hashes, kind, "response, bytes_sent, bytes_received")}
        self._refuse_invalid([r for r, _, _ in found.values()], kind)
        return found

    def lookup_embeddings(self, hashes: list[str], kind: str) -> dict[str, torch.Tensor]:
        """The embeddings stored with the answers of a ``+embedding`` kind, for the hashes that have one."""
        found = {h: _floats(blob) for h, blob in self._select(hashes, kind, "embedding", "AND embedding IS NOT NULL")}
        if found:
            vectors = list(found.values())
            why = ("embeddings of different lengths" if len({len(v) for v in vectors}) > 1
                   else embedding_problem(torch.stack(vectors), len(vectors), None))
            if why is not None:
                raise PoisonedLedger(f"the ledger {self.path} holds invalid embeddings ({why});"
                                     f" remove them with `b2kd ledger clean {self.path}`")
        return found

    def _refuse_invalid(self, responses: list[torch.Tensor], kind: str) -> None:
        if not responses:
            return
        try:
            why = problem(torch.stack(responses), kind)
        except RuntimeError:  # rows of different lengths
            why = "rows of different numbers of classes"
        if why is not None:
            raise PoisonedLedger(f"the ledger {self.path} holds invalid '{kind}' answers ({why});"
                                 f" remove them with `b2kd ledger clean {self.path}` (they will be"
                                 " paid for again)")

    def invalid_ids(self) -> list[int]:
        """Row ids whose response is no valid answer of the row's kind."""
        bad: list[int] = []
        kinds = [k for (k,) in self._db.execute("SELECT DISTINCT kind FROM queries")]
        for kind in kinds:
            rows = self._db.execute("SELECT id, response FROM queries WHERE kind = ?", (kind,)).fetchall()
            by_length: dict[int, list[tuple[int, np.ndarray]]] = {}
            for i, blob in rows:
                values = np.frombuffer(blob, dtype=np.float32)
                by_length.setdefault(len(values), []).append((i, values))
            for length, group in by_length.items():
                if length < 2:
                    bad += [i for i, _ in group]
                    continue
                try:
                    mask = invalid_rows(torch.from_numpy(np.stack([v for _, v in group])), kind)
                except ValueError:  # a kind this b2kd does not know
                    mask = torch.ones(len(group), dtype=torch.bool)
                bad += [i for (i, _), b in zip(group, mask.tolist(), strict=True) if b]
            bad += self._invalid_embedding_ids(kind)
        return sorted(set(bad))

    def _invalid_embedding_ids(self, kind: str) -> list[int]:
        """Rows of a ``+embedding`` kind whose embedding is missing, unreadable or not finite."""
        try:
            if not ResponseKind.parse(kind).embedding:
                return []
        except ValueError:
            return []  # a kind this b2kd does not know: its rows are bad already
        rows = self._db.execute("SELECT id, embedding FROM queries WHERE kind = ?", (kind,)).fetchall()
        bad = [i for i, blob in rows if not blob or len(blob) % 4]
        good = [(i, np.frombuffer(blob, dtype=np.float32)) for i, blob in rows if blob and not len(blob) % 4]
        if good:
            sizes = [len(v) for _, v in good]
            usual = max(set(sizes), key=sizes.count)  # the server's D: other lengths are bad
            bad += [i for i, v in good if len(v) != usual
                    or embedding_problem(torch.from_numpy(v.copy())[None], 1, None) is not None]
        return bad

    def clean(self) -> tuple[int, int]:
        """Delete the rows holding invalid answers; (rows removed, rows kept)."""
        bad = self.invalid_ids()
        with self._db:
            self._db.executemany("DELETE FROM queries WHERE id = ?", [(i,) for i in bad])
        (kept,) = self._db.execute("SELECT COUNT(*) FROM queries").fetchone()
        return len(bad), kept

    def record(
        self,
        hashes: list[str],
        images: torch.Tensor,
        responses: torch.Tensor,
        kind: str,
        bytes_sent: list[int],
        bytes_received: list[int],
        stage: str,
        embeddings: torch.Tensor | None = None,
        provider: Provider | None = None,
    ) -> None:
        """Store one paid batch in a single transaction (all rows or none); invalid answers never.

        A ``+embedding`` kind's answers must come with their embeddings (N, D); ``provider`` is
        who answered (None: unknown)."""
        why = problem(responses, kind)
        if why is None and ResponseKind.parse(kind).embedding:
            why = embedding_problem(embeddings, len(responses), None)
        if why is not None:
            raise InvalidAnswer(f"refusing to record invalid '{kind}' answers: {why}")
        emb = None
        if ResponseKind.parse(kind).embedding:
            emb = embeddings.detach().float().cpu().numpy()
        now = time.time()
        source = None if provider is None else self.provider_id(provider)
        shape = "x".join(str(d) for d in images.shape[1:])
        imgs = images.cpu().numpy()
        resp = responses.detach().float().cpu().numpy()
        rows = [
            (
                h,
                kind,
                int(bytes_sent[i]),
                int(bytes_received[i]),
                resp[i].tobytes(),
                imgs[i].tobytes() if self.keep_images else None,
                shape,
                stage,
                now,
                emb[i].tobytes() if emb is not None else None,
                source,
            )
            for i, h in enumerate(hashes)
        ]
        with self._db:
            self._db.executemany(
                "INSERT OR IGNORE INTO queries (hash, kind, bytes_sent, bytes_received, response,"
                " image, shape, stage, created, embedding, provider)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    def provider_id(self, provider: Provider) -> int:
        """The row id of a provider in table ``providers`` (added on first use)."""
        key = (provider.url, provider.model, provider.version, provider.response)
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO providers (url, model, version, response)"
                             " VALUES (?, ?, ?, ?)", key)
            (found,) = self._db.execute("SELECT id FROM providers WHERE url = ? AND model = ? AND"
                                        " version = ? AND response = ?", key).fetchone()
        return found

    def providers(self) -> list[Provider]:
        """Every provider whose answers the ledger holds (answers of unknown provider not included)."""
        rows = self._db.execute("SELECT url, model, version, response FROM providers WHERE id IN"
                                " (SELECT DISTINCT provider FROM queries) ORDER BY id").fetchall()
        return [Provider(*row) for row in rows]

    def other_providers(self, provider: Provider) -> list[Provider]:
        """The providers, other than ``provider``'s teacher, whose answers the ledger holds: a run
        that would train on them and on ``provider``'s would mix two teachers. Answers recorded
        before providers were (NULL) are not counted: who gave them is unknown."""
        return [p for p in self.providers() if not p.same_teacher(provider)]

    def record_refused(self, refused: Refused, reason: str, stage: str,
                       provider: Provider | None = None) -> None:
        """Count an answer that arrived and was refused (its images and bytes, why, from whom);
        the answer itself is not stored."""
        source = None if provider is None else self.provider_id(provider)
        with self._db:
            self._db.execute(
                "INSERT INTO refused (images, bytes_sent, bytes_received, reason, stage, provider, created)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (refused.images, refused.bytes_sent, refused.bytes_received, reason[:500], stage, source,
                 time.time()),
            )

    def count(self, stage: str | None = None) -> int:
        """Paid queries of one stage, or of every stage but the evaluation ones."""
        return self.totals(stage)["queries"]

    def totals(self, stage: str | None = None) -> dict[str, int]:
        """Queries and bytes of one stage, or of every stage but the evaluation ones; beside what
        was paid, the answers received and refused (``refused_answers``: their images,
        ``refused_bytes``: the bytes they came in)."""
        if stage:
            where, args = "WHERE stage = ?", [stage]
        else:
            where = f"WHERE stage NOT IN ({','.join('?' * len(EVALUATION_STAGES))})"
            args = list(EVALUATION_STAGES)
        q, sent, recv = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes_sent), 0), COALESCE(SUM(bytes_received), 0)"
            f" FROM queries {where}",
            args,
        ).fetchone()
        refused, refused_bytes = self._db.execute(
            f"SELECT COALESCE(SUM(images), 0), COALESCE(SUM(bytes_received), 0) FROM refused {where}", args,
        ).fetchone()
        return {"queries": q, "bytes_sent": sent, "bytes_received": recv,
                "refused_answers": refused, "refused_bytes": refused_bytes}

    def sent_hashes(self) -> set[str]:
        return {h for (h,) in self._db.execute("SELECT hash FROM queries")}

    def images(self) -> tuple[list[str], torch.Tensor | None]:
        """Hashes and images kept in the ledger (None when images were not kept)."""
        rows = self._db.execute(
            "SELECT hash, image, shape FROM queries WHERE image IS NOT NULL ORDER BY id"
        ).fetchall()
        if not rows:
            return [], None
        shape = tuple(int(d) for d in rows[0][2].split("x"))
        arr = np.stack([np.frombuffer(r[1], dtype=np.uint8).reshape(shape) for r in rows])
        return [r[0] for r in rows], torch.from_numpy(arr)

    def private_images_sent(self, private_images: torch.Tensor, batch: int = 4096) -> int:
        """How many of the given private images appear in the ledger (by exact bytes)."""
        sent = self.sent_hashes()
        hits = 0
        for start in range(0, len(private_images), batch):
            hits += sum(h in sent for h in image_hashes(private_images[start : start + batch]))
        return hits


def clean_ledger(run: str | Path) -> tuple[Path, int, int]:
    """Remove the invalid answers of a run's ledger (a run directory or the file itself);
    (the ledger's path, rows removed, rows kept)."""
    path = Path(run)
    if path.is_dir():
        path = path / "ledger.sqlite"
    if not path.is_file():
        raise BlackBoxError(f"no ledger at {path}: give a run directory or a ledger .sqlite file")
    try:
        with Ledger(path) as ledger:
            removed, kept = ledger.clean()
    except sqlite3.DatabaseError as exc:
        raise BlackBoxError(f"{path} is not a b2kd ledger ({exc})") from None
    return path, removed, kept
