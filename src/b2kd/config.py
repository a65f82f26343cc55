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


class ConfigError(Exception):
    """A configuration file or override that cannot be used."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    dataset: str = "mnist"
    root: str | None = None
    image_size: int = 28
    channels: int = 1
    local_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 0
    # labelled images of the teacher's training split outside the private set: every tuned value
    # is chosen on them (reported as dev_acc), never on the test set
    dev_size: int = Field(5000, ge=0)
    # a distribution gap between the teacher's data and the private set (b2kd.data.shift)
    private_shift: Literal["none", "imbalance", "corrupt"] = "none"
    shift_classes: list[int] = [5, 6, 7, 8, 9]  # imbalance: these classes ...
    shift_factor: float = Field(0.1, gt=0, le=1)  # ... kept at this fraction of their frequency
    corruptions: list[str] = ["blur", "noise", "rotation", "contrast"]  # corrupt: one per image
    private_dataset: str | None = None  # the private set from another reader entirely (all its
    private_root: str | None = None  # train split, resized to the teacher's input)


class TeacherConfig(_Section):
    arch: str = "cnn_small"
    checkpoint: str | None = None  # an existing teacher; later stages read it
    url: str | None = None  # a served teacher (Open Inference Protocol); queries go there instead
    api_key: str | None = None  # sent as 'Authorization: Bearer KEY'; never written to config.yaml
    binary: bool = True  # images as raw bytes (binary tensor extension), not JSON lists
    shared_cache: str | None = None  # a ledger of responses paid once and reused across runs (bench)
    # a served model's inputs and answers (b2kd.edge.preprocess, README "Any provider"):
    # FP32/FP16 inputs get (pixel * scale - mean) / std per channel, from a preset and/or the keys
    input_preset: str | None = None  # raw, unit, symmetric, mnist, cifar10, imagenet
    input_scale: float | None = None
    input_mean: list[float] | None = None
    input_std: list[float] | None = None
    output: Literal["probabilities", "logits"] = "probabilities"  # logits: softmax on the edge
    # a gray-box server's embedding output (N, D) when it is no b2kd server (which names it itself)
    embedding_output: str | None = None
    # every wait is bounded: connection errors and 5xx are retried `retries` times; each wait
    # (Retry-After or backoff) is at most max_wait_s, a request gives up after max_total_wait_s
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(6, ge=0)
    backoff_s: float = Field(0.5, gt=0)
    max_wait_s: float = Field(60.0, gt=0)
    max_total_wait_s: float = Field(600.0, gt=0)
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_padding: int = 2


class DeprivatizeConfig(_Section):
    generator: str | None = None  # an existing generator checkpoint; distill reads it
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-4
    d_lr: float | None = Field(None, gt=0)  # the discriminator's own rate (None: lr); TTUR
    betas: tuple[float, float] = (0.5, 0.999)
    alpha: float = 0.5  # weight of the information-maximisation term
    widths: tuple[int, int] = (128, 64)
    response: str = "soft"
    query_every: int = 5  # query the teacher on every k-th generator step
    query_batch: int = 16  # images queried at each such step
    max_queries: int = 5000  # the stage's own budget
    # spectral normalisation of D's layers, without its BatchNorm (SN-GAN, Miyato et al., 2018);
    # with d_lr 4 x lr and a longer GAN it is both bench files' setting (25 epochs on the main bench,
    # 40 under the gaps; chosen on dev); alone, at the demo's 15 epochs, D is too weak and G draws
    # broken strokes (docs/performance.md)
    spectral_norm: bool = False


class DistillConfig(_Section):
    method: str = "mekd"
    response: str = "soft"
    budget: int = Field(20000, ge=1)
    student: str = "lenet5"
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: list[int] = [80, 160]  # used by the step schedule (lr x0.1 at each)
    tau: float = 5.0
    tau_g: float = 5.0
    beta: float = 1.0
    distance: Literal["l1", "l2"] = "l1"
    # hard responses: "ce" (cross-entropy on the label) measured 96.2% vs 71.8% for the
    # reference "kl" at tau 5 on the MNIST demo (LeNet-5 student, 20k queries)
    hard_loss: Literal["kl", "ce"] = "ce"
    val_fraction: float = Field(0.05, ge=0, lt=1)  # held-out slice of the paid pool
    select: Literal["val", "last"] = "val"
    # the report warns of a class holding under this fraction of a uniform pool's share (b2kd.pool_labels)
    thin_class_factor: float = Field(0.25, ge=0, le=1)
    # random shifts of paid images (same response, no new query): 96.2% vs 93.8% without
    # on the MNIST demo (soft, 20k queries)
    crop_padding: int = 2
    query_batch: int = 500
    max_steps: int | None = None  # stop early (smoke runs, throughput checks)
    # local-data methods: fill a budget past the private set's size with shifted copies of it
    transfer_copies: bool = False
    steps: int | None = Field(None, ge=1)  # training length in steps, whatever the pool's size
    grad_clip: float | None = Field(5.0, gt=0)  # cap on the student's global gradient norm
    warmup_steps: int = Field(50, ge=0)  # linear learning-rate warm-up; the schedule steps per step
    # semi-supervised distillation (b2kd.semisup): the private images train the student on the
    # device, unlabelled (FixMatch consistency on confident pseudo-labels); never sent
    local_unlabelled: bool = True
    # gray-box answers (a +embedding response kind): weight of the term matching the student's
    # penultimate features, through a learned projection, to the teacher's embedding (0: off)
    feature_weight: float = Field(1.0, ge=0)
    unlabelled_weight: float = Field(1.0, ge=0)
    unlabelled_threshold: float = Field(0.95, ge=0, le=1)
    unlabelled_ratio: float = Field(1.0, gt=0)  # unlabelled batch = ratio x batch_size
    # generator methods: add the images deprivatization paid for, with their answers, to the pool
    # (no new query; counted as setup_queries beside the pool's)
    reuse_setup: bool = True
    # generator methods: "balanced" pays a first part at random, fits the student on it, then
    # spends the rest on free generator candidates chosen so the teacher's classes are even
    pool: Literal["random", "balanced"] = "balanced"
    balance_first: float = Field(0.25, gt=0, le=1)  # share of the budget paid at random first
    balance_candidates: int = Field(4, ge=1)  # candidates scored per remaining query
    balance_fit_steps: int = Field(200, ge=0)  # student steps on the first part
    # sd of latent neighbours drawn around the first part's images of a class short of candidates
    # (a GAN that seldom draws a class); 0: off. 0.1 chosen on dev under the imbalance gap at the
    # default FixMatch threshold (0.1 / 0.2 / 0.5: 91.26 / 90.78 / 88.68%, off 85.00%); at threshold
    # 0.8, 0.2 was better (93.74 / 92.08%): bench-mnist-gap.yaml sets both (docs/benchmarks.md)
    balance_neighbours: float = Field(0.1, ge=0)
    # share of each class's candidates dropped before the picks, those deprivatization's
    # discriminator rates least like the private images (b2kd.realism); 0: off
    balance_realism: float = Field(0.0, ge=0, lt=1)
    # generator methods: share of the budget paid at latents around private images inverted into
    # the generator on the device (b2kd.anchored_pool); 0: off. anchor_sd is the perturbation (the
    # privacy/accuracy knob), anchor_floor the quantile of the private set's own nearest-neighbour
    # distances under which a candidate is dropped before it is paid, anchor_per the images per anchor
    anchor_share: float = Field(0.0, ge=0, lt=1)
    anchor_sd: float = Field(0.5, ge=0)
    anchor_floor: float = Field(0.05, ge=0, lt=1)
    anchor_per: int = Field(4, ge=1)
    # weight of the term training the student on the anchored private images, each labelled with
    # its paid neighbours' mean answer (on the device; 0: off)
    anchor_weight: float = Field(1.0, ge=0)
    # weight of CORAL (Sun & Saenko, 2016) between the student's penultimate features on paid
    # images and on the private images (unsupervised domain alignment, on the device; 0: off)
    coral_weight: float = Field(0.0, ge=0)
    # generator methods: share of the budget paid for mixtures of the pool's own generator images,
    # where a student fitted on the pool is least sure (b2kd.mixup_pool; Active Mixup without
    # private images); 0: off
    mixup_share: float = Field(0.0, ge=0, lt=1)
    # baselines (b2kd.methods); each reads only its own keys
    dkd_alpha: float = 1.0  # DKD target-class term
    dkd_beta: float = 8.0  # DKD non-target-class term
    al_weight: float = 0.1  # AL: weight of the adversarial term in the student's loss
    al_lr: float = 1e-3  # AL: the logit discriminator's Adam learning rate
    am_seed_fraction: float = Field(0.5, gt=0, le=1)  # AM: share of the budget spent on the seed set
    am_cycles: int = Field(2, ge=1)  # AM: rounds of mixup selection after the seed set
    am_candidates: int = Field(4, ge=1)  # AM: mixups scored per image kept
    am_fit_steps: int = Field(100, ge=0)  # AM: student steps between rounds
    db3kd_search_steps: int = Field(6, ge=1)  # DB3KD: binary-search steps per direction
    db3kd_query_cap: int = Field(60, ge=2)  # DB3KD: most queries spent on one image
    # DB3KD: boundary distance -> soft label; MNIST distances are 0.08-0.2. Re-checked on dev in
    # stop 17 (CPU bench settings, seed 0): at 20k, 0.001 / 0.003 / 0.01 / 0.03 / 0.1 gave 93.48 /
    # 93.72 / 93.18 / 90.08 / 60.04%, but 0.003 falls to 40.8% at 5k (0.03: 84.1%); over 5k / 20k /
    # 50k, 0.03 has the best mean dev accuracy of the two measured at every budget
    db3kd_temperature: float = Field(0.03, gt=0)
    dafl_steps: int = Field(300, ge=0)  # DAFL: white-box generator steps
    dafl_batch_size: int = Field(64, ge=1)
    dafl_lr: float = 0.02  # DAFL generator's Adam learning rate

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
    slice (``round(n * val_fraction)``, as b2kd.distill splits it) is not empty when asked for."""
    n = batch_size
    while n - round(n * val_fraction) < batch_size or (val_fraction > 0 and round(n * val_fraction) < 1):
        n += 1
    return n


class ServeConfig(_Section):
    """``b2kd serve``: the provider's side of the API."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    model_name: str = "teacher"
    response: str = "soft"  # what the API answers: soft, hard, topk:K, rounded:D (+embedding: gray-box)
    api_keys: list[str] = []  # "KEY" (no quota) or "KEY:QUOTA"; none: no key needed
    key_outputs: list[str] = []  # "KEY=OUTPUT[,OUTPUT...]": the outputs a key may read (others: all)
    rate_limit: float | None = Field(None, gt=0)  # requests per second per key (429 beyond)
    burst: int = Field(10, ge=1)  # requests a key may send at once before the rate applies
    max_batch: int = Field(1024, ge=1)  # images per request (413 beyond)
    max_body_bytes: int | None = Field(None, ge=1)  # None: what max_batch images take as JSON
    # also from a file (one KEY[:QUOTA] a line) and the B2KD_SERVE_KEYS environment variable
    api_key_file: str | None = None
    store: str | None = None  # quotas and replay records: None: OUT/state.sqlite; or postgresql://...
    secret_file: str | None = None  # key-id HMAC secret; None: OUT/secret (created, mode 0600)
    metrics_key: str | None = None  # if set (or B2KD_METRICS_KEY), /metrics and stats need it
    replay_ttl_s: float = Field(86400.0, gt=0)  # an answered request id is replayed free this long
    replay_per_key: int = Field(10000, ge=1)  # answers kept for replay per key, oldest dropped
    read_timeout_s: float = Field(30.0, gt=0)  # a request's head, and its body, must arrive within
    max_connections: int = Field(1000, ge=1)  # connections and requests in flight (503 beyond)
    auth_failures: int = Field(10, ge=1)  # failed authentications per address at once, then 1/s


class DistributedConfig(_Section):
    """Data-parallel training under torchrun (b2kd.distributed); a single process ignores it.

    Batch sizes stay per process: the effective batch is ``batch_size x world size``."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: NCCL on CUDA, gloo on CPU
    timeout_s: float = Field(1800.0, gt=0)  # longest wait of one collective (rank 0 paying included)
    sync_batchnorm: bool = False  # BatchNorm statistics over the whole batch (CUDA only)
    # learning rate for the effective batch: "linear" x world size, "sqrt" x its root, "none" as set
    scale_lr: Literal["none", "linear", "sqrt"] = "none"


class AdaptConfig(_Section):
    """``b2kd adapt``: a new task learnt on the device from a distilled student (b2kd.adapt).

    A new linear head on the student's penultimate features (body frozen), then optional
    fine-tuning of the whole student with a term that keeps its old head's answers on the
    private images close to the distilled student's. No teacher is queried."""

    run: str | None = None  # the `b2kd distill` run adapted (set by b2kd adapt)
    labelled: str | None = None  # the new task's labelled images: class folders or an .npz
    test: str | None = None  # a labelled test set of the new task, same formats (report only)
    classes: list[str] | None = None  # the new task's class names, in order (None: from the data)
    shots: int | None = Field(None, ge=1)  # labelled images per class, a seeded choice
    head_epochs: int = Field(100, ge=1)  # passes over the shots' features, body frozen
    finetune_epochs: int = Field(2, ge=0)  # passes over the private images, whole student
    lr: float = Field(0.01, gt=0)  # Adam, the new head
    finetune_lr: float = Field(0.01, gt=0)  # SGD (momentum 0.9), the whole student
    keep_weight: float = Field(1.0, ge=0)  # weight of the old head's KL to the distilled student
    tau: float = Field(2.0, gt=0)  # temperature of that KL
    batch_size: int = Field(64, ge=1)
    seed: int = 0  # the shots drawn and the training


class Config(_Section):
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"  # cpu, cuda, or auto
    out: str = "runs/default"
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    deprivatize: DeprivatizeConfig = DeprivatizeConfig()
    distill: DistillConfig = DistillConfig()
    serve: ServeConfig = ServeConfig()
    distributed: DistributedConfig = DistributedConfig()
    adapt: AdaptConfig = AdaptConfig()


#: Options b2kd no longer has: each measured no better than the value given here on the dev split,
#: and b2kd now always runs as that value. ANY: a setting that only mattered beside another one.
ANY = object()
REMOVED: dict[str, Any] = {
    "deprivatize.init": "default",
    "deprivatize.diffaugment": [],
    "deprivatize.ema": None,
    "deprivatize.select": "last",
    "deprivatize.select_from": ANY,
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
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    """The fully resolved configuration, written into the run directory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tree = cfg.model_dump(mode="json", exclude=SECRETS)
    Path(path).write_text(yaml.safe_dump(tree, sort_keys=False))
