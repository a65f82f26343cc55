"""The quota store on SQLite and on a real PostgreSQL server: the same semantics, the same race.

Reservations (charged before the model runs), settling, refunds, takeover of a
request a killed server left, replay records expiring by age and capped per key
while running, a store refusing another key secret, and two server processes
(`b2kd serve` and one in the test's process) sharing one store with 8
clients: the quota is never exceeded and the usage equals the images answered.
"""

from __future__ import annotations

import sqlite3
import threading

import httpx
import pytest
from postgres_server import fresh_database, postgres_bin, postgres_server
from served import ThreadServer, images, toy_model

from b2kd.blackbox.protocol import HEADER_LENGTH, Tensor, encode
from b2kd.core.checkpoint import save_classifier
from b2kd.provider.keys import load_secret
from b2kd.provider.serve import ServedTeacher
from b2kd.provider.store import (
    Answer,
    QuotaExhausted,
    RequestIdReused,
    Reservation,
    StoreError,
    open_store,
)

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="module")
def pg_server():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed and could not be (Debian: apt-get install postgresql;"
                    " `make test` installs it)")
    with postgres_server() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def location(request, tmp_path):
    """A fresh store location of each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite")
    return fresh_database(request.getfixturevalue("pg_server"))


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def store_at(location, quotas=None, clock=None, secret="check-1", **kw):
    return open_store(location, {"k": 10} if quotas is None else quotas, secret_check=secret,
                      clock=clock or Clock(), **kw)


def test_reserve_settle_replay_and_quota(location):
    store = store_at(location)
    held = store.reserve("k", "r1", "d1", 4)
    assert isinstance(held, Reservation) and store.usage()["k"] == (4, 10)  # charged before computing
    answer = store.settle(held, b"body-1", 7)
    assert (answer.body, answer.header_length, answer.replayed) == (b"body-1", 7, False)
    assert store.replay("k", "r1", "d1") == Answer(b"body-1", 7, replayed=True)
    assert store.reserve("k", "r1", "d1", 4) == Answer(b"body-1", 7, replayed=True)  # free
    with pytest.raises(RequestIdReused):
        store.reserve("k", "r1", "other", 4)
    with pytest.raises(QuotaExhausted, match="4 of 10 queries used and 7 more"):
        store.reserve("k", None, "d2", 7)
    assert store.usage()["k"] == (4, 10) and store.records() == 1
    store.close()


def test_refunds_and_a_takeover_are_charged_once(location):
    store = store_at(location)
    held = store.reserve("k", "r2", "d2", 3)
    assert store.usage()["k"][0] == 3
    # a retry of the same request (the first server was killed): taken over, not charged again
    assert store.reserve("k", "r2", "d2", 3) == held and store.usage()["k"][0] == 3
    with pytest.raises(RequestIdReused, match="in use"):
        store.reserve("k", "r2", "another body", 3)
    store.refund(held)
    store.refund(held)  # twice: nothing more
    assert store.usage()["k"][0] == 0
    store.settle(held, b"late", None)  # its twin, refunded meanwhile, settles: charged then
    assert store.usage()["k"][0] == 3 and store.replay("k", "r2", "d2").body == b"late"
    twin = store.reserve("k", "r3", "d3", 2)
    store.settle(twin, b"first", None)
    assert store.settle(twin, b"second", None) == Answer(b"first", None, replayed=True)
    assert store.usage()["k"][0] == 5
    store.close()


def test_records_expire_and_are_capped_while_running(location):
    clock = Clock(0.0)
    store = store_at(location, {"k": None}, clock=clock, ttl_s=100.0, per_key=3)
    for i in range(5):
        clock.now = float(i)
        store.settle(store.reserve("k", f"r{i}", f"d{i}", 1), f"b{i}".encode(), None)
    assert store.records() == 3 and store.replay("k", "r1", "d1") is None  # r0 and r1 dropped
    clock.now = 103.5  # r2 (t=2) and r3 (t=3) are past the window, r4 (t=4) is not
    assert store.replay("k", "r3", "d3") is None and store.replay("k", "r4", "d4").body == b"b4"
    store.reserve("k", None, "x", 1)  # the next request purges (at most once a minute)
    assert store.records() == 1
    again = store.reserve("k", "r2", "a different body", 1)  # an expired id is a new request
    assert isinstance(again, Reservation) and store.usage()["k"][0] == 7
    store.close()


def test_an_abandoned_reservation_is_refunded_after_its_lease(location):
    clock = Clock(0.0)
    store = store_at(location, clock=clock, lease_s=600.0)
    store.reserve("k", None, "d", 5)  # the server computing it was killed
    assert store.usage()["k"][0] == 5
    clock.now = 601.0
    store.purge()
    assert store.usage()["k"][0] == 0
    store.close()


def test_a_store_refuses_a_server_with_another_secret(location):
    store_at(location, secret="check-1").close()
    with pytest.raises(StoreError, match="another key secret"):
        store_at(location, secret="check-2")
    store_at(location, secret="check-1").close()  # the right one still opens it


def test_usage_under_unsalted_ids_is_carried_over(tmp_path):
    """A state file written before key ids were keyed hashes keeps its usage."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE keys (key_id TEXT PRIMARY KEY, quota INTEGER, used INTEGER NOT NULL"
                   " DEFAULT 0)")
        db.execute("INSERT INTO keys VALUES ('k-old', 100, 42)")
    store = open_store(path, {"k-new": 100}, secret_check="c", legacy_ids={"k-old": "k-new"})
    assert store.usage() == {"k-new": (42, 100)}
    store.close()


# --- two server processes, 8 clients, one quota ---------------------------------------------------


def race(urls: list[str], key: str, clients: int = 8, per_client: int = 10, batch: int = 8) -> tuple[int, int]:
    """8 clients, alternating between the servers, each sending batches until refused:
    (images answered, requests refused with 402)."""
    answered, refused, errors = [0], [0], []
    lock = threading.Lock()

    def client(i: int) -> None:
        try:
            with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
                for j in range(per_client):
                    x = images(batch, seed=1000 * i + j)
                    header = {"id": f"c{i}-{j}"} if j % 2 else {}
                    body, length = encode(header, "inputs", [Tensor("images", x.numpy(), True)])
                    r = c.post(urls[(i + j) % len(urls)] + "/infer", content=body,
                               headers={HEADER_LENGTH: str(length)})
                    with lock:
                        if r.status_code == 402:
                            refused[0] += 1
                            return
                        assert r.status_code == 200, r.text[:200]
                        answered[0] += batch
        except Exception as exc:  # noqa: BLE001 -- reported on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return answered[0], refused[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("race") / "teacher.pt"
    save_classifier(toy_model(), path, dataset="npz", image_size=28)
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_server_processes_never_exceed_one_quota(backend, checkpoint, tmp_path, request):
    """A `b2kd serve` process and a server in this test's process share one store."""
    quota = 300
    secret_file = tmp_path / "server" / "secret"
    if backend == "sqlite":  # one host: both on one state file (and the secret beside it)
        store, extra = tmp_path / "server" / "state.sqlite", ()
    else:  # two hosts: one database, one secret given to both
        secret_file.parent.mkdir()
        secret_file.write_text("a shared secret of two hosts\n")
        store = fresh_database(request.getfixturevalue("pg_server"))
        extra = (f"serve.store={store}", f"serve.secret_file={secret_file}")
    served = ServedTeacher(checkpoint, tmp_path / "server", "soft", api_keys=(f"k:{quota}",),
                           overrides=extra).start()
    try:
        served.wait()
        with ThreadServer(toy_model(), api_keys={"k": quota}, state=store,
                          secret=load_secret(secret_file, create=False)) as local:
            answered, refused = race([served.url, local.url], "k")
            used = local.app.state.store.usage()[local.app.state.key_id("k")][0]
    finally:
        served.stop()
    assert refused >= 1, "the demand (640 images) exceeds the quota (300): someone must be refused"
    assert used == answered <= quota and answered == quota - quota % 8


def test_a_lost_database_connection_is_a_503_and_the_server_reconnects(pg_server, tmp_path):
    """PostgreSQL restarted or the connection cut: 503 with Retry-After, nothing charged, and the
    next request goes through on a new connection."""
    import psycopg

    url = fresh_database(pg_server)
    with ThreadServer(toy_model(), api_keys={"k": 100}, state=url) as s:
        body, length = encode({}, "inputs", [Tensor("images", images(2).numpy(), True)])

        def post() -> httpx.Response:
            return httpx.post(s.url + "/infer", content=body,
                              headers={"Authorization": "Bearer k", HEADER_LENGTH: str(length)})

        assert post().status_code == 200
        with psycopg.connect(url, autocommit=True) as admin:  # cut the server's connection
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        r = post()
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert "nothing was charged" in r.json()["error"]
        assert post().status_code == 200
        assert s.app.state.store.usage()[s.app.state.key_id("k")][0] == 4
