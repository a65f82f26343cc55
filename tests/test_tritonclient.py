"""NVIDIA's tritonclient against a real `b2kd serve` process: every call a Triton user makes.

Health, metadata, model configuration (``max_batch_size``), inference
statistics, and inference with JSON and binary tensors and gzip- or
deflate-compressed request bodies, with the key read by the server from a key
file and from ``B2KD_SERVE_KEYS`` (never the command line).
"""

from __future__ import annotations

import numpy as np
import pytest
from served import images, toy_model

from b2kd.blackbox import LocalBackend
from b2kd.core.checkpoint import save_classifier
from b2kd.provider.serve import ServedTeacher

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a test extra")

FILE_KEY, ENV_KEY = "sk-from-a-file", "sk-from-the-env"


def test_tritonclient_calls_against_b2kd_serve(tmp_path):
    model = toy_model()
    save_classifier(model, tmp_path / "teacher.pt", dataset="npz", image_size=28)
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# the provider's keys\n{FILE_KEY}:1000\n")
    key_file.chmod(0o600)
    server = ServedTeacher(tmp_path / "teacher.pt", tmp_path / "server", "soft",
                           overrides=("--api-key-file", str(key_file), "serve.max_batch=32"),
                           env={"B2KD_SERVE_KEYS": f"{ENV_KEY}:50"})
    x = images(4, seed=3).numpy()
    expected = LocalBackend(model).infer(images(4, seed=3)).responses.numpy()
    with server:
        client = httpclient.InferenceServerClient(server.url.split("//")[1].split("/")[0],
                                                  connection_timeout=10, network_timeout=30)
        auth = {"Authorization": f"Bearer {FILE_KEY}"}
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("teacher")
        assert client.get_model_metadata("teacher")["inputs"][0]["datatype"] == "UINT8"
        config = client.get_model_config("teacher")
        assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [1, 28, 28]
        answers = {}
        for name, binary, compression in (("json", False, None), ("binary", True, None),
                                          ("gzip", True, "gzip"), ("deflate", False, "deflate")):
            tensor = httpclient.InferInput("images", list(x.shape), "UINT8")
            tensor.set_data_from_numpy(x, binary_data=binary)
            wanted = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
            result = client.infer("teacher", [tensor], outputs=[wanted], headers=dict(auth),  # it edits it
                                  request_compression_algorithm=compression)
            answers[name] = result.as_numpy("probabilities")
        tensor = httpclient.InferInput("images", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        client.infer("teacher", [tensor], headers={"Authorization": f"Bearer {ENV_KEY}"})
        with pytest.raises(httpclient.InferenceServerException, match="unknown API key"):
            client.infer("teacher", [tensor], headers={"Authorization": "Bearer sk-not-a-key"})
        (stats,) = client.get_inference_statistics("teacher")["model_stats"]
        client.close()
    for name, answer in answers.items():
        np.testing.assert_allclose(answer, expected, rtol=0, atol=1e-6, err_msg=name)
    assert stats["inference_count"] == 5 * 4 and stats["execution_count"] == 5
    assert stats["inference_stats"]["success"]["count"] == 5
    log = (tmp_path / "server" / "serve.log").read_text()
    assert FILE_KEY not in log and ENV_KEY not in log
