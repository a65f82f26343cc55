"""Server keys from the command line, a file and the environment; the key-id secret; key ids."""

from __future__ import annotations

import hashlib
import stat
import threading

import pytest
from served import toy_model

from b2kd.blackbox import LocalBackend
from b2kd.core.checkpoint import save_classifier
from b2kd.core.config import Config
from b2kd.provider.keys import (
    KeySetupError,
    key_id,
    load_secret,
    parse_api_keys,
    server_keys,
)
from b2kd.provider.serve import serve
from b2kd.provider.server import ServerSettings, create_app
from b2kd.provider.store import StoreError


def test_keys_come_from_the_command_line_a_file_and_the_environment(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# provider keys\nsk-file:100   # a comment\n\n  sk-open  \n")
    keys = server_keys(["sk-cli:5"], path, {"B2KD_SERVE_KEYS": "sk-env-a:7, sk-env-b sk-cli:5"})
    assert keys == {"sk-cli": 5, "sk-file": 100, "sk-open": None, "sk-env-a": 7, "sk-env-b": None}
    assert server_keys([], None, {}) == {}
    with pytest.raises(KeySetupError, match="twice with different quotas"):
        server_keys(["sk-cli:5"], None, {"B2KD_SERVE_KEYS": "sk-cli:6"})
    with pytest.raises(KeySetupError, match="cannot read the API key file"):
        server_keys([], tmp_path / "missing.txt", {})
    for bad in ("k:x", ":5", "a b:1"):
        with pytest.raises(KeySetupError):
            parse_api_keys([bad])


def test_the_secret_is_created_once_private_and_shared_by_racing_processes(tmp_path):
    path = tmp_path / "out" / "secret"
    secrets: list[bytes] = []
    threads = [threading.Thread(target=lambda: secrets.append(load_secret(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(secrets)) == 1 and len(secrets[0]) == 64  # 32 random bytes, hex
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temporary file left
    assert load_secret(path) == secrets[0]
    with pytest.raises(KeySetupError, match="cannot read"):
        load_secret(tmp_path / "given", create=False)
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(KeySetupError, match="too short"):
        load_secret(tmp_path / "short")


def test_key_ids_are_hmacs_of_the_key_under_the_secret():
    import hmac

    secret = b"0123456789abcdef0123456789abcdef"
    expected = "k-" + hmac.new(secret, b"sk-1", hashlib.sha256).hexdigest()[:16]
    assert key_id("sk-1", secret) == expected
    assert key_id("sk-1", secret + b"x") != expected
    assert expected != "k-" + hashlib.sha256(b"sk-1").hexdigest()[:16]


def test_serve_refuses_a_state_file_written_under_another_secret(tmp_path):
    """A lost or replaced secret would silently reset every quota: `b2kd serve` stops instead."""
    save_classifier(toy_model(), tmp_path / "teacher.pt", dataset="npz", image_size=28)
    out = tmp_path / "server"
    first = ServerSettings(api_keys={"sk": 10}, state=out / "state.sqlite", secret=load_secret(out / "secret"))
    create_app(LocalBackend(toy_model()), first).state.store.close()  # as `b2kd serve` left it
    (tmp_path / "other-secret").write_text("another secret of 32 characters\n")
    cfg = Config.model_validate({
        "out": str(out), "teacher": {"checkpoint": str(tmp_path / "teacher.pt")},
        "serve": {"port": 0, "api_keys": ["sk:10"], "secret_file": str(tmp_path / "other-secret")}})
    with pytest.raises(StoreError, match="another key secret"):
        serve(cfg, log=lambda *_: None)


@pytest.mark.parametrize("spec", ["K1:99999999999999999999999", "K1:1000000000001", "K1:0", "K1:5:6",
                                  "K1:", "K1:-1", "K1:+5", "K1:٣", "K1: 5"])
def test_a_quota_is_one_whole_number_from_1_to_10_to_the_12(spec):
    """Before: a 23-digit quota ended in an OverflowError deep in the store, and K1:5:6 was read
    as the key 'K1:5' with quota 6 without a word."""
    with pytest.raises(KeySetupError, match=r"KEY or KEY:QUOTA, QUOTA a whole number from 1 to 1,000,000,000,000"):
        parse_api_keys([spec])


def test_the_largest_quota_and_a_key_without_one_are_kept():
    assert parse_api_keys(["K1:1000000000000", "K2", "K3:1"]) == {"K1": 10**12, "K2": None, "K3": 1}


@pytest.mark.parametrize("spec", ["K1:99999999999999999999999", "K1:5:6"])
def test_serve_refuses_a_bad_quota_in_one_line_before_starting(spec, tmp_path):
    from test_cli import assert_user_error, invoke

    save_classifier(toy_model(), tmp_path / "teacher.pt", dataset="npz", image_size=28)
    result = invoke("serve", "--checkpoint", tmp_path / "teacher.pt", "--out", tmp_path / "server",
                    "--port", "0", "--api-key", spec)
    assert_user_error(result, "each API key must be given as KEY or KEY:QUOTA")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert spec not in result.output  # a key is never echoed
    assert not (tmp_path / "server").exists()
