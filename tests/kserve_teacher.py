"""A teacher served by a third-party v2 server: the ``kserve`` SDK's ModelServer (a test extra).

Run as a process by tests/test_third_party_server.py:
``python tests/kserve_teacher.py CHECKPOINT PORT``. It serves one b2kd checkpoint as a
provider would, under four model names:

- ``fp32``: FP32 input ``[-1, 1, 28, 28]``, already normalised (pixels / 255 - 0.5) / 0.5;
  answers probabilities;
- ``fp16``: the same with FP16 inputs;
- ``fixed4``: FP32 input with a fixed batch dimension ``[4, 1, 28, 28]``;
- ``logits``: UINT8 input, answers the network's logits (not probabilities);
- ``untyped``: as ``fp32``, but, as a custom model that does not override its input types,
  its metadata lists no input (``"inputs": []``).

kserve sends ``"parameters": null`` on JSON outputs and answers 501 to versioned URLs.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

from b2kd.models import load_classifier


class Served(Model):
    def __init__(self, name: str, net: torch.nn.Module, datatype: str, batch: int, logits: bool):
        super().__init__(name)
        self.net, self.datatype, self.batch, self.logits = net.eval(), datatype, batch, logits
        self.ready = True

    def get_input_types(self) -> list[dict]:
        return [{"name": "pixels", "datatype": self.datatype, "shape": [self.batch, 1, 28, 28]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "scores", "datatype": "FP32", "shape": [-1, 10]}]

    @torch.no_grad()
    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        x = torch.from_numpy(np.array(payload.inputs[0].as_numpy()))
        if self.batch != -1 and len(x) != self.batch:
            raise ValueError(f"this model takes batches of exactly {self.batch}")
        # a uint8 batch goes through the checkpoint's own normalisation; floats arrive normalised
        out = self.net(x) if x.dtype == torch.uint8 else self.net.features_logits(x.float())
        if not self.logits:
            out = torch.softmax(out.float(), dim=1)
        result = InferOutput("scores", list(out.shape), "FP32")
        binary = bool((payload.parameters or {}).get("binary_data_output", False))
        result.set_data_from_numpy(out.float().numpy(), binary_data=binary)
        return InferResponse(payload.id, self.name, [result], use_binary_outputs=binary)


class Untyped(Served):
    def get_input_types(self) -> list[dict]:
        return Model.get_input_types(self)


def main(checkpoint: str, port: int) -> None:
    net, _ = load_classifier(checkpoint)
    models = [Served("fp32", net, "FP32", -1, False), Served("fp16", net, "FP16", -1, False),
              Served("fixed4", net, "FP32", 4, False), Served("logits", net, "UINT8", -1, True),
              Untyped("untyped", net, "FP32", -1, False)]
    ModelServer(http_port=port, enable_grpc=False, workers=1).start(models)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
