"""DAFL, Data-Free Learning (Chen et al., ICCV 2019): a labelled white-box reference point.

A generator is trained against the teacher's own network, with its gradients
and penultimate features, so it needs neither private images nor the
deprivatization generator, but it cannot run against a real API (the pipeline
refuses it when ``teacher.url`` is set). The white-box forward and backward
passes through the local teacher are not queries and are not counted as such.

Once trained, the generator draws a fixed pool of ``budget`` uint8 images that
is paid for through the black-box teacher like every other pool, so the query
accounting (ledger, budget, resume) is the same as for any other method; the
student then learns from the paid responses with Knockoff's loss.

The generator's widths are fixed at (64, 32) (the distill config does not carry
the deprivatize section's widths); its latent size is the number of classes.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from b2kd.blackbox import BlackBoxError
from b2kd.core.checkpoint import save_generator
from b2kd.core.runtime import fast_layout
from b2kd.distill.methods.base import Acquisition, Method
from b2kd.models import Generator, load_generator, to_unit
from b2kd.pool.paid import load_or_draw, pay, synthesise

#: Weights of the DAFL generator loss (the paper's MNIST settings).
ACTIVATION_WEIGHT = 0.1
ENTROPY_WEIGHT = 5.0


def dafl_generator_loss(
    logits: torch.Tensor, features: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAFL's generator loss from the teacher's logits and penultimate features.

    one_hot: cross-entropy of the logits against their own argmax;
    activation: minus the mean absolute feature value;
    entropy: minus the (natural-log) entropy of the batch-mean softmax, which
    rewards batches that cover the classes evenly.
    total = one_hot + 0.1 * activation + 5 * entropy.
    """
    one_hot = F.cross_entropy(logits, logits.argmax(1))
    activation = -features.abs().mean()
    mean_p = F.softmax(logits, dim=1).mean(0)
    entropy = (mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    total = one_hot + ACTIVATION_WEIGHT * activation + ENTROPY_WEIGHT * entropy
    parts = {"one_hot": float(one_hot.detach()), "activation": float(activation.detach()),
             "entropy": float(entropy.detach())}
    return total, parts


def _final_linear(model: torch.nn.Module) -> torch.nn.Linear:
    """The classifier's last Linear layer; its input is the penultimate feature vector."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise BlackBoxError("DAFL needs a teacher whose logits come from a final Linear layer")
    return linears[-1]


class DAFL(Method):
    name = "dafl"
    source = "white-box"
    needs_soft = False
    white_box = True
    widths = (64, 32)

    def train_generator(self, acq: Acquisition) -> Generator:
        """Train (or read back from ``dafl-generator.pt``) the generator against the local teacher.

        The teacher is put in eval mode with its parameters frozen for the
        duration and restored afterwards (it is the backend's own object).
        Per-step losses go to ``dafl.jsonl``.
        """
        cfg, model = self.cfg, acq.local_model
        channels, size, _ = acq.teacher.image_shape
        config = {"latent_dim": acq.teacher.num_classes, "image_size": size, "channels": channels,
                  "widths": list(self.widths)}
        settings = {"seed": acq.seed, "steps": cfg.dafl_steps, "batch_size": cfg.dafl_batch_size,
                    "lr": cfg.dafl_lr}
        path = acq.out / "dafl-generator.pt"
        if path.is_file():
            generator, meta = load_generator(path)
            if generator.config == config and meta.get("dafl") == settings:
                return fast_layout(generator.to(acq.device))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(acq.seed)
            generator = fast_layout(Generator(**config).to(acq.device))
        optimizer = torch.optim.Adam(generator.parameters(), lr=cfg.dafl_lr)
        rng = torch.Generator().manual_seed(acq.seed + 1)
        features: list[torch.Tensor] = []
        hook = _final_linear(model).register_forward_hook(
            lambda module, inputs, output: features.append(inputs[0])
        )
        was_training = model.training
        grad_flags = [p.requires_grad for p in model.parameters()]
        model.eval().requires_grad_(False)
        history = []
        try:
            generator.train()
            for step in range(cfg.dafl_steps):
                z = torch.randn(cfg.dafl_batch_size, config["latent_dim"], generator=rng)
                z = z.to(acq.device)
                features.clear()
                logits = model(to_unit(generator(z)))
                loss, parts = dafl_generator_loss(logits, features[-1])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history.append({"step": step, "loss": float(loss.detach()), **parts})
        finally:
            hook.remove()
            model.train(was_training)
            for p, flag in zip(model.parameters(), grad_flags, strict=True):
                p.requires_grad_(flag)
        generator.eval().requires_grad_(False)
        with open(acq.out / "dafl.jsonl", "w") as fh:
            fh.writelines(json.dumps(record) + "\n" for record in history)
        save_generator(generator, path, method="dafl", dafl=settings)
        return generator

    def acquire(self, acq: Acquisition) -> tuple[torch.Tensor, torch.Tensor]:
        """Train the DAFL generator, draw a seeded pool of ``budget`` images from it, pay for it.

        Pays ``budget`` queries through the black-box teacher (cached images are free),
        exactly like a generator method's fixed pool.
        """
        if acq.local_model is None:
            raise BlackBoxError("DAFL is white-box: it needs the teacher's own network, not an API")
        # the generator is needed (trained, or read back) only when the pool is not stored yet
        images = load_or_draw(acq.out / "pool.pt", acq.budget, acq.seed, "dafl",
                               lambda: synthesise(self.train_generator(acq), acq.budget, acq.seed))
        return images, pay(acq.teacher, images, acq.query_batch, acq.on_paid)

    def loss(self, student, images, idx):
        """As Knockoff: tau^2 KL at ``distill.tau``; CE on the label if hard and hard_loss=ce."""
        return self.match(student(images), idx)
