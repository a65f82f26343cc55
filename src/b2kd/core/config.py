"""Configuration for every stage: defaults < YAML file < CLI options < dotted overrides.

Every CLI option is also a key here (``distill.budget`` is ``--budget``), and any
key can be overridden on the command line as ``section.key=value`` where the
value is parsed as YAML (``distill.milestones=[10,20]``).

The defaults are MEKD's recipe: the settings that measured best on the dev split
(configs/demo.yaml only sizes a run; configs/paper-mnist.yaml is the reference experiment).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from b2kd import __version__


class ConfigError(Exception):
    """A configuration file or override that cannot be used."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    dataset: str = Field(
        "mnist",
        description="The teacher's dataset: mnist, fashion_mnist, cifar10, cifar100, svhn, digits, "
                    "folder or npz")
    root: str | None = Field(
        None,
        description="Where the dataset's files are (None: where its installed data package keeps "
                    "them)")
    image_size: int = Field(
        28, description="Side of the square images every model takes, in pixels")
    channels: int = Field(1, description="1 (grey) or 3 (colour)")
    local_fraction: float = Field(
        0.1, gt=0, lt=1,
        description="Share of the training split held back as the edge's private, unlabelled set")
    split_seed: int = Field(0, description="Seed of the private / teacher / dev split")
    dev_size: int = Field(
        5000, ge=0,
        description="Labelled training images outside the private set that every tuned value is "
                    "chosen on (dev_acc); never the test set")
    private_shift: Literal["none", "imbalance", "corrupt"] = Field(
        "none",
        description="A gap between the teacher's data and the private set: none, imbalance or "
                    "corrupt")
    shift_classes: list[int] = Field(
        [5, 6, 7, 8, 9], description="imbalance: the classes made rare")
    shift_factor: float = Field(
        0.1, gt=0, le=1,
        description="imbalance: the fraction of their frequency those classes keep")
    corruptions: list[str] = Field(
        ["blur", "noise", "rotation", "contrast"],
        description="corrupt: the corruptions, one drawn per image")
    private_dataset: str | None = Field(
        None,
        description="The private set from another dataset entirely (its train split, resized to the "
                    "teacher's input)")
    private_root: str | None = Field(None, description="Where that dataset's files are")


class TeacherConfig(_Section):
    arch: str = Field("cnn_small", description="The teacher's architecture when b2kd trains it")
    checkpoint: str | None = Field(
        None, description="An existing teacher checkpoint; later stages read it")
    url: str | None = Field(
        None, description="A served teacher (Open Inference Protocol): queries go there instead")
    api_key: str | None = Field(
        None, description="Sent as 'Authorization: Bearer KEY'; never written to config.yaml")
    binary: bool = Field(
        True, description="Send images as raw bytes (the binary tensor extension), not JSON lists")
    shared_cache: str | None = Field(
        None, description="A ledger of answers paid once and reused across runs (bench)")
    input_name: str | None = Field(
        None,
        description="A served model's image input by name, where its metadata lists none or several")
    input_datatype: Literal["UINT8", "FP32", "FP16"] | None = Field(
        None, description="That input's datatype, where the metadata lists none or a wrong one")
    input_shape: list[int] | None = Field(
        None,
        description="That input's shape, [C, H, W] or [N, C, H, W] (N = -1: any batch), where the "
                    "metadata lists none or a wrong one")
    input_preset: str | None = Field(
        None,
        description="A served model's input scaling: raw, unit, symmetric, mnist, cifar10 or "
                    "imagenet")
    input_scale: float | None = Field(
        None, description="FP32/FP16 inputs are (pixel * scale - mean) / std: the scale")
    input_mean: list[float] | None = Field(
        None, description="The per-channel mean of that normalisation")
    input_std: list[float] | None = Field(
        None, description="The per-channel std of that normalisation")
    output: Literal["probabilities", "logits"] = Field(
        "probabilities",
        description="What a served model answers: probabilities, or logits (softmax on the edge)")
    embedding_output: str | None = Field(
        None, description="A gray-box server's embedding output (N, D) when it is no b2kd server")
    timeout_s: float = Field(
        60.0, gt=0, description="Longest attempt (connect, send, every read), in seconds")
    retries: int = Field(6, ge=0, description="Retries of connection errors and 5xx answers")
    backoff_s: float = Field(
        0.5, gt=0, description="First wait between retries, growing exponentially")
    max_wait_s: float = Field(
        60.0, gt=0, description="Longest single wait (Retry-After or backoff)")
    max_total_wait_s: float = Field(
        120.0, gt=0,
        description="Longest time one request may take in all (attempts, waits, reads)")
    max_response_mb: float | None = Field(
        None, gt=0,
        description="The largest answer taken, in MB (None: from the batch and the classes, with "
                    "slack)")
    allow_mixed_providers: bool = Field(
        False,
        description="Resume a run's ledger against another teacher (URL, model, version), mixing "
                    "both teachers' answers")
    epochs: int = Field(3, description="Training epochs of the teacher")
    batch_size: int = Field(128, description="The teacher's training batch")
    lr: float = Field(0.05, description="The teacher's SGD learning rate (cosine schedule)")
    momentum: float = Field(0.9, description="The teacher's SGD momentum")
    weight_decay: float = Field(5e-4, description="The teacher's weight decay")
    crop_padding: int = Field(
        2, description="Random shifts of the teacher's training images, in pixels")


class DeprivatizeConfig(_Section):
    generator: str | None = Field(
        None, description="An existing generator checkpoint; distill reads it")
    epochs: int = Field(20, description="GAN epochs over the private images")
    batch_size: int = Field(64, description="GAN batch")
    lr: float = Field(
        8e-4, description="Adam learning rate of G (and of D unless d_lr is set); four times the "
                          "reference's 2e-4: +3.6 dev points on Fashion-MNIST, +0.1 on MNIST, same time")
    d_lr: float | None = Field(
        3.2e-3, gt=0, description="The discriminator's own Adam rate (None: lr); TTUR, 4x G's with "
                                  "spectral_norm")
    betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas of G and D")
    alpha: float = Field(0.5, description="Weight of the information-maximisation term in G's loss")
    widths: tuple[int, int] = Field(
        (128, 64), description="Channel widths of the generator's two blocks")
    response: str = Field(
        "soft",
        description="What the teacher answers during deprivatization: soft, hard, topk:K, rounded:D")
    query_every: int = Field(5, description="Query the teacher on every k-th generator step")
    query_batch: int = Field(16, description="Images queried at each such step")
    max_queries: int = Field(5000, description="The stage's own query budget")
    spectral_norm: bool = Field(
        True,
        description="Spectrally normalised D without BatchNorm (SN-GAN; with d_lr 4x lr: +3.3 dev "
                    "points on Fashion-MNIST, a tie on MNIST)")
    d_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="Dropout2d rate after each of D's convolutions (the reference's 0.25; none with "
                    "spectral_norm: +1.02 dev points on Fashion-MNIST, -0.05 on MNIST, same time)")


class DistillConfig(_Section):
    method: str = Field(
        "mekd", description="mekd, or a baseline: kd, ml, al, dkd, kn, am, db3kd, dafl")
    response: str = Field(
        "soft",
        description="What the teacher answers: soft, hard, topk:K, rounded:D (+embedding: gray-box)")
    budget: int = Field(20000, ge=1, description="Queries paid for the pool")
    student: str = Field(
        "lenet5",
        description="The student's architecture (LeNet-5: the student every default was measured "
                    "with)")
    epochs: int = Field(20, ge=1, description="Passes over the paid pool")
    batch_size: int = Field(128, ge=1, description="Training batch (per process under torchrun)")
    lr: float = Field(0.05, description="The student's SGD learning rate")
    momentum: float = Field(0.9, description="SGD momentum")
    weight_decay: float = Field(5e-4, description="SGD weight decay")
    schedule: Literal["cosine", "step"] = Field(
        "cosine", description="Learning-rate schedule, stepped per step: cosine or step")
    milestones: list[int] = Field(
        [80, 160], description="step schedule: epochs at which the rate is multiplied by 0.1")
    tau: float = Field(5.0, description="Temperature of the KL on soft answers")
    tau_g: float = Field(
        5.0, description="Temperature of the logits the generator reads (MEKD's alignment term)")
    beta: float = Field(
        1.0, description="Weight of the answer-matching term beside MEKD's alignment")
    distance: Literal["l1", "l2"] = Field("l1", description="MEKD's image distance: l1 or l2")
    hard_loss: Literal["kl", "ce"] = Field(
        "ce",
        description="Loss on hard answers: ce (cross-entropy on the label; 96.2% against 71.8% for "
                    "kl on the MNIST demo) or kl (the reference form)")
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Held-out slice of the paid pool that chooses best.pt")
    select: Literal["val", "last"] = Field(
        "val", description="best.pt: the epoch best on the held-out slice (val), or the last")
    thin_class_factor: float = Field(
        0.25, ge=0, le=1,
        description="The report warns of a class holding under this fraction of a uniform pool's "
                    "share")
    crop_padding: int = Field(
        2, description="Random shifts of paid images (same answer, no new query), in pixels")
    query_batch: int = Field(500, description="Images per request to the teacher")
    max_steps: int | None = Field(
        None, description="Stop after this many steps (smoke runs, throughput checks)")
    transfer_copies: bool = Field(
        False,
        description="Local-data methods: fill a budget past the private set's size with shifted "
                    "copies of it")
    steps: int | None = Field(
        None, ge=1, description="Training length in steps, whatever the pool's size (None: epochs)")
    grad_clip: float | None = Field(
        5.0, gt=0, description="Cap on the student's global gradient norm (None: no cap)")
    warmup_steps: int = Field(50, ge=0, description="Steps of linear learning-rate warm-up")
    local_unlabelled: bool = Field(
        True,
        description="Train the student on the private images too, on the device and unlabelled "
                    "(FixMatch); never sent")
    feature_weight: float = Field(
        1.0, ge=0,
        description="Gray-box answers: weight of matching the student's features to the teacher's "
                    "embedding (0: off)")
    unlabelled_weight: float = Field(1.0, ge=0, description="Weight of the FixMatch term")
    unlabelled_threshold: float = Field(
        0.95, ge=0, le=1, description="Confidence a pseudo-label needs to count")
    unlabelled_ratio: float = Field(
        2.0, gt=0,
        description="Private images per step of the FixMatch term, as a multiple of batch_size (2 "
                    "against 1: +0.51 dev points on Fashion-MNIST, a tie on MNIST; 3 seeds)")
    domain_mixup: float = Field(
        1.0, ge=0,
        description="With local_unlabelled: weight of the inter-domain mixup term (paid generator "
                    "images mixed with private ones, trained on the same mix of the teacher's answer "
                    "and the student's own; 0: off)")
    reuse_setup: bool = Field(
        True,
        description="Generator methods: add deprivatization's paid answers to the pool (no new "
                    "query)")
    pool: Literal["random", "balanced"] = Field(
        "balanced",
        description="Generator methods: random, or balanced (the rest of the budget evens the "
                    "teacher's classes after a random first part)")
    balance_first: float = Field(
        0.25, gt=0, le=1, description="balanced: share of the budget paid at random first")
    balance_candidates: int = Field(
        4, ge=1, description="balanced: free generator candidates scored per remaining query")
    balance_fit_steps: int = Field(
        200, ge=0, description="balanced: student steps on the first part before scoring")
    balance_neighbours: float = Field(
        0.1, ge=0,
        description="balanced: sd of latent neighbours drawn for a class short of candidates (0: "
                    "off)")
    balance_realism: float = Field(
        0.0, ge=0, lt=1,
        description="balanced: share of each class's candidates dropped, those deprivatization's D "
                    "rates least real (0: off)")
    # baselines (b2kd.distill.methods); each reads only its own keys
    dkd_alpha: float = Field(1.0, description="DKD: weight of the target-class term")
    dkd_beta: float = Field(8.0, description="DKD: weight of the non-target-class term")
    al_weight: float = Field(
        0.1, description="AL: weight of the adversarial term in the student's loss")
    al_lr: float = Field(1e-3, description="AL: the logit discriminator's Adam learning rate")
    am_seed_fraction: float = Field(
        0.5, gt=0, le=1, description="AM: share of the budget spent on the seed set")
    am_cycles: int = Field(2, ge=1, description="AM: rounds of mixup selection after the seed set")
    am_candidates: int = Field(4, ge=1, description="AM: mixups scored per image kept")
    am_fit_steps: int = Field(100, ge=0, description="AM: student steps between rounds")
    db3kd_search_steps: int = Field(6, ge=1, description="DB3KD: binary-search steps per direction")
    db3kd_query_cap: int = Field(60, ge=2, description="DB3KD: most queries spent on one image")
    db3kd_temperature: float = Field(
        0.03, gt=0,
        description="DB3KD: temperature from boundary distance to soft label (best mean dev "
                    "accuracy over 5k-50k on MNIST)")
    dafl_steps: int = Field(300, ge=0, description="DAFL: white-box generator steps")
    dafl_batch_size: int = Field(64, ge=1, description="DAFL: generator batch")
    dafl_lr: float = Field(0.02, description="DAFL: the generator's Adam learning rate")

    @model_validator(mode="after")
    def _budget_pays_for_training(self) -> DistillConfig:
        """Refuse, before anything is paid, a budget whose pool cannot fill one training batch."""
        least = min_budget(self.batch_size, self.val_fraction)
        if self.budget < least:
            raise PydanticCustomError(
                "budget_too_small",
                "budget {budget} is too small: the paid pool must hold at least one full"
                " training batch (distill.batch_size {batch}) plus its validation slice"
                " (distill.val_fraction {val}), so at least {least} queries",
                {"budget": self.budget, "batch": self.batch_size, "val": self.val_fraction,
                 "least": least})
        return self


def min_budget(batch_size: int, val_fraction: float) -> int:
    """The smallest pool whose training part holds ``batch_size`` images and whose validation
    slice (``round(n * val_fraction)``, as b2kd.distill.run splits it) is not empty when asked for."""
    n = batch_size
    while n - round(n * val_fraction) < batch_size or (val_fraction > 0 and round(n * val_fraction) < 1):
        n += 1
    return n


class ServeConfig(_Section):
    """``b2kd serve``: the provider's side of the API."""

    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port)")
    model_name: str = Field("teacher", description="The model's name in the API's paths")
    response: str = Field(
        "soft",
        description="What the API answers: soft, hard, topk:K, rounded:D (+embedding: gray-box)")
    api_keys: list[str] = Field(
        [], description="'KEY' (no quota) or 'KEY:QUOTA'; none: no key needed")
    key_outputs: list[str] = Field(
        [], description="'KEY=OUTPUT[,OUTPUT...]': the outputs a key may read (others: all)")
    rate_limit: float | None = Field(
        None, gt=0, description="Requests per second per key (429 beyond; None: no limit)")
    burst: int = Field(
        10, ge=1, description="Requests a key may send at once before the rate applies")
    max_batch: int = Field(1024, ge=1, description="Images per request (413 beyond)")
    max_body_bytes: int | None = Field(
        None, ge=1, description="Largest request body (None: what max_batch images take as JSON)")
    api_key_file: str | None = Field(
        None, description="Keys from a file, one KEY[:QUOTA] a line (also B2KD_SERVE_KEYS)")
    store: str | None = Field(
        None, description="Quotas and replay records: None (OUT/state.sqlite) or postgresql://...")
    secret_file: str | None = Field(
        None, description="Key-id HMAC secret (None: OUT/secret, created with mode 0600)")
    metrics_key: str | None = Field(
        None, description="If set (or B2KD_METRICS_KEY), /metrics and stats need it")
    replay_ttl_s: float = Field(
        86400.0, gt=0, description="An answered request id is replayed free this long, in seconds")
    replay_per_key: int = Field(
        10000, ge=1, description="Answers kept for replay per key, oldest dropped")
    read_timeout_s: float = Field(
        30.0, gt=0,
        description="A request's head, and its body, must arrive within this many seconds")
    max_connections: int = Field(
        1000, ge=1, description="Connections and requests in flight (503 beyond)")
    max_connections_per_address: int | None = Field(
        None, ge=1,
        description="Connections one client address may hold (503 beyond, counted in /metrics; None: a "
                    "quarter of max_connections)")
    auth_failures: int = Field(
        10, ge=1, description="Failed authentications per address at once, then one a second")


class DistributedConfig(_Section):
    """Data-parallel training under torchrun (b2kd.core.distributed); a single process ignores it.

    Batch sizes stay per process: the effective batch is ``batch_size x world size``."""

    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto (NCCL on CUDA, gloo on CPU), gloo or nccl")
    timeout_s: float = Field(
        1800.0, gt=0, description="Longest wait of one collective, rank 0's paying included")
    sync_batchnorm: bool = Field(
        False, description="BatchNorm statistics over the whole batch (CUDA only)")
    scale_lr: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="Learning rate for the effective batch: none, linear (x world size) or sqrt")


class AdaptConfig(_Section):
    """``b2kd adapt``: a new task learnt on the device from a distilled student (b2kd.deploy.adapt).

    A new linear head on the student's penultimate features (body frozen), then optional
    fine-tuning of the whole student with a term that keeps its old head's answers on the
    private images close to the distilled student's. No teacher is queried."""

    run: str | None = Field(None, description="The `b2kd distill` run adapted (set by b2kd adapt)")
    labelled: str | None = Field(
        None, description="The new task's labelled images: class folders or an .npz")
    test: str | None = Field(
        None, description="A labelled test set of the new task, same formats (report only)")
    classes: list[str] | None = Field(
        None, description="The new task's class names, in order (None: from the data)")
    shots: int | None = Field(
        None, ge=1, description="Labelled images per class, a seeded choice (None: all)")
    head_epochs: int = Field(100, ge=1, description="Passes over the shots' features, body frozen")
    finetune_epochs: int = Field(
        2, ge=0, description="Passes over the private images, whole student")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the new head")
    finetune_lr: float = Field(
        0.01, gt=0, description="SGD learning rate (momentum 0.9) of the whole student")
    keep_weight: float = Field(
        1.0, ge=0, description="Weight of the old head's KL to the distilled student")
    tau: float = Field(2.0, gt=0, description="Temperature of that KL")
    batch_size: int = Field(
        64, ge=1, description="Batch of the head's training and the fine-tuning")
    seed: int = Field(0, description="Seed of the shots drawn and the training")


class Config(_Section):
    seed: int = Field(
        0, description="Seed of every random draw: splits, pools, initialisation, shuffling")
    threads: int | None = Field(None, description="Torch CPU threads (None: torch's own choice)")
    device: str = Field("cpu", description="cpu, cuda, or auto (CUDA when there is one)")
    out: str = Field("runs/default", description="The run directory")
    data: DataConfig = Field(
        DataConfig(),
        description="The datasets: the teacher's, the edge's private set, and the dev split")
    teacher: TeacherConfig = Field(
        TeacherConfig(),
        description="The teacher: its architecture and training, or a served teacher and its client")
    deprivatize: DeprivatizeConfig = Field(
        DeprivatizeConfig(), description="Step one of MEKD: the GAN trained on the private images")
    distill: DistillConfig = Field(
        DistillConfig(), description="Step two: the paid pool and the student's training")
    serve: ServeConfig = Field(
        ServeConfig(), description="`b2kd serve`: the provider's side of the API")
    distributed: DistributedConfig = Field(
        DistributedConfig(), description="Data-parallel training under torchrun")
    adapt: AdaptConfig = Field(
        AdaptConfig(),
        description="`b2kd adapt`: a new task learnt on the device from a distilled student")


#: Options b2kd no longer has: each measured no better than the value given here on the dev split,
#: and b2kd now always runs as that value. ANY: a setting that only mattered beside another one.
ANY = object()
REMOVED: dict[str, Any] = {
    "deprivatize.init": "default",
    "deprivatize.diffaugment": [],
    "deprivatize.ema": None,
    "deprivatize.select": "last",
    "deprivatize.select_from": ANY,
    "deprivatize.patience": None,
    "deprivatize.latent_extra": 0,
    "deprivatize.ema_decay": 0.0,
    "deprivatize.balance_real": 0.0,
    "deprivatize.balance_from": ANY,
    "deprivatize.balance_fit_steps": ANY,
    "deprivatize.balance_max_boost": ANY,
    "distill.optimizer": "sgd",
    "distill.hard_smoothing": 0.0,
    "distill.hard_logit_scale": 1.0,
    "distill.unlabelled_adaptive": False,
    "distill.unlabelled_sharpen": None,
    "distill.unlabelled_strength": 1.0,
    "distill.unlabelled_targets": "student",
    "distill.student_ema": None,
    "distill.balance_unsure": 0.5,
    "distill.balance_latent_sd": 1.0,
    "distill.anchor_share": 0.0,
    "distill.anchor_sd": ANY,
    "distill.anchor_floor": ANY,
    "distill.anchor_per": ANY,
    "distill.anchor_weight": ANY,
    "distill.coral_weight": 0.0,
    "distill.mixup_share": 0.0,
}
_warned: set[tuple[str, str]] = set()


def removed_settings(tree: dict) -> list[tuple[str, Any, Any]]:
    """Pop the removed options out of a config tree; returns (key, value, kept value) for each one
    set to something else than the behaviour b2kd kept."""
    changed = []
    for dotted, kept in REMOVED.items():
        section, key = dotted.split(".")
        node = tree.get(section)
        if isinstance(node, dict) and key in node:
            value = node.pop(key)
            if kept is not ANY and value != kept and not (value == () and kept == []):
                changed.append((dotted, value, kept))
    return changed


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list, tuple, type(None), bool)) else str(value)


#: The top-level key of a run's config.yaml naming the b2kd version that wrote it.
VERSION_KEY = "b2kd_version"
MAX_UNKNOWN = 4

#: Secrets that stay out of the config.yaml written into run directories.
SECRETS = {"teacher": {"api_key"}, "serve": {"api_keys", "metrics_key", "store"}}


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # PyYAML reads 1e-3 as a string (YAML 1.1 wants 1.0e-3)
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def load_config(
    path: str | Path | None = None,
    options: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Defaults, then the YAML file, then CLI options (dotted keys, None = not given), then overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of sections")
        # an older run's config.yaml names options b2kd no longer has: it still loads (to evaluate,
        # export or resume the run), and one line says which settings of it are not applied
        changed = removed_settings(tree)
        line = ", ".join(f"{k}={_shown(v)} (now always {_shown(kept)})" for k, v, kept in changed)
        if changed and (str(path), line) not in _warned:
            _warned.add((str(path), line))
            logging.getLogger("b2kd").warning(
                f"{path}: ignoring settings of options b2kd no longer has (they measured no better on"
                f" the dev split): {line}")
    written_by = tree.pop(VERSION_KEY, None) if path is not None else None
    in_file = _dotted_keys(tree) if path is not None else set()
    given = [(k, v) for k, v in (options or {}).items() if v is not None]
    for key, value in given + [parse_override(text) for text in overrides or []]:
        if key in REMOVED:
            kept = REMOVED[key]
            if kept is ANY or value == kept:
                continue  # asks for what b2kd does anyway
            raise ConfigError(f"{key} is no longer an option: it measured no better on the dev split"
                              f" and b2kd now always runs as {key}={_shown(kept)}; drop it")
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_invalid(exc, path, written_by, in_file)) from None


def _dotted_keys(tree: dict) -> set[str]:
    """'section' and 'section.key' for every section and key of a config tree."""
    keys = set(tree)
    for section, node in tree.items():
        if isinstance(node, dict):
            keys.update(f"{section}.{key}" for key in node)
    return keys


def _invalid(exc: ValidationError, path: Path | None, written_by: Any, in_file: set[str]) -> str:
    """One line for a config that does not validate. Keys of the file this version does not know
    name the version that wrote the file (its ``b2kd_version``) beside this one."""
    located = [(".".join(map(str, e["loc"])), e) for e in exc.errors()]
    unknown = [loc for loc, e in located if e["type"] == "extra_forbidden" and loc in in_file]
    rest = "; ".join(f"{loc}: {e['msg']}" for loc, e in located if loc not in unknown)
    if not unknown:
        return f"invalid configuration: {rest}"
    keys = ", ".join(unknown[:MAX_UNKNOWN]) + (f" and {len(unknown) - MAX_UNKNOWN} more"
                                               if len(unknown) > MAX_UNKNOWN else "")
    source = (f"{path} was written by b2kd {written_by}" if written_by is not None else
              f"{path} names no b2kd version (written by hand, or by a b2kd that did not record it)")
    return (f"{source} and sets keys b2kd {__version__} does not know: {keys}; read it with the"
            " version that wrote it, or drop those keys" + (f" (also: {rest})" if rest else ""))


def save_config(cfg: Config, path: str | Path) -> None:
    """The fully resolved configuration, written into the run directory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tree = {VERSION_KEY: __version__, **cfg.model_dump(mode="json", exclude=SECRETS)}
    Path(path).write_text(yaml.safe_dump(tree, sort_keys=False))
