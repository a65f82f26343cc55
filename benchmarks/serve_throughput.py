"""Throughput of a served teacher: queries/s through `b2kd serve` and HTTPTeacher, by batch size.

Starts `b2kd serve` on 127.0.0.1 in a subprocess with a teacher checkpoint (default: a
randomly initialised teacher of the config's architecture; throughput does not depend on
the weights), sends fresh random uint8 images (so no answer is replayed from the server's
store) in the binary format, and prints queries/s, bytes per query each way, and the
in-process backend's queries/s on the same batches for comparison. Client and server share
the machine. Example:

    .venv/bin/python benchmarks/serve_throughput.py --batches 1 256 --seconds 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from b2kd.blackbox import LocalBackend
from b2kd.core.checkpoint import save_classifier
from b2kd.core.config import load_config
from b2kd.core.runtime import hardware
from b2kd.edge.client import HTTPTeacher
from b2kd.models import build_model
from b2kd.provider.serve import ServedTeacher


def rate(infer, shape: tuple[int, ...], seconds: float) -> dict:
    """Queries/s and mean bytes per query of ``infer`` on fresh random batches for ``seconds``."""
    rng = torch.Generator().manual_seed(0)
    for _ in range(3):  # warm-up
        infer(torch.randint(0, 256, shape, dtype=torch.uint8, generator=rng))
    queries, sent, received, busy = 0, 0, 0, 0.0
    while busy < seconds:
        batch = torch.randint(0, 256, shape, dtype=torch.uint8, generator=rng)
        start = time.perf_counter()
        answer = infer(batch)
        busy += time.perf_counter() - start
        queries += shape[0]
        sent += sum(answer.bytes_sent)
        received += sum(answer.bytes_received)
    return {"queries_per_s": queries / busy, "bytes_sent_per_query": sent / queries,
            "bytes_received_per_query": received / queries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--checkpoint", default=None, help="teacher to serve (default: random weights)")
    parser.add_argument("--response", default="soft")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    cfg = load_config(args.config)
    d = cfg.data
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            torch.manual_seed(0)
            checkpoint = Path(tmp) / "teacher.pt"
            save_classifier(build_model(cfg.teacher.arch, 10, d.channels, d.image_size), checkpoint)
        local = LocalBackend.from_checkpoint(checkpoint, args.response)
        shape = local.image_shape
        figures: dict = {"hardware": hardware(), "arch": cfg.teacher.arch, "response": args.response,
                         "server_threads": args.threads, "batches": {}}
        with ServedTeacher(checkpoint, Path(tmp) / "server", args.response, threads=args.threads) as server, \
                HTTPTeacher(server.url, batch_size=max(args.batches)) as backend:
            for batch in args.batches:
                served = rate(backend.infer, (batch, *shape), args.seconds)
                in_process = rate(local.infer, (batch, *shape), args.seconds)["queries_per_s"]
                figures["batches"][batch] = {**served, "in_process_queries_per_s": in_process}
                print(f"batch {batch:4d}: {served['queries_per_s']:9.1f} queries/s served"
                      f" ({in_process:9.1f} in-process); {served['bytes_sent_per_query']:.1f} B sent,"
                      f" {served['bytes_received_per_query']:.1f} B received per query")
    print(f"{cfg.teacher.arch}, {args.response} responses, {figures['hardware']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
