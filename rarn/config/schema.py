"""The config schema: one frozen dataclass per stage, each field typed, bounded or a choice.

A field's allowed values sit next to it, so the schema is also the reference:

* ``Annotated[int, Range(1, 10_000)]``: an interval (upper limits keep absurd sizes, such as
  ``search.epochs=1e29`` or a batch of a billion, from reaching a trial);
* ``Literal[...]`` aliases (:data:`DecodeRule`, :data:`TrainMethod`, ...): closed choices. They
  are the one list of allowed values; the library's tuples derive from them (``typing.get_args``);
* plain ``str`` for names backed by a registry (``data.name``, ``evaluation.attacks``,
  ``retrain.genotype``, the constraint's ``estimator``/``bound``/``mixture``/``threshold``/
  ``balance``), checked against the registry itself by a rule registered beside it
  (:func:`rarn.config.rules.registry_rule`): a new entry is one line in its registry.

Nothing here validates: :mod:`rarn.config.build` does, when a config is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

__all__ = [
    "Augment",
    "ChoiceError",
    "Config",
    "ConfigError",
    "ConstraintConfig",
    "DataConfig",
    "DecodeRule",
    "EvaluationConfig",
    "GradNormMode",
    "PerturbationEstimate",
    "DecodeObjective",
    "Range",
    "RetrainConfig",
    "RetrainImages",
    "Schedule",
    "SearchConfig",
    "SelectMode",
    "StudyConfig",
    "TrackingConfig",
    "TrainMethod",
    "TuneConfig",
    "TuneScheduler",
]


class ConfigError(ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value).

    The message names the dotted key, the value and what is allowed; command-line front ends turn
    it into exit code 2.
    """


class ChoiceError(ConfigError, KeyError):
    """A value outside a closed choice or a registry: a :class:`ConfigError`, and also a
    ``KeyError`` like the registry lookup it stands for (``pytest.raises(KeyError)`` and
    ``except KeyError`` around a registry keep working)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Range:
    """The interval a numeric field must lie in; ``bounds`` says which ends are closed."""

    lo: float | None = None
    hi: float | None = None
    bounds: str = "[]"  # "[]", "[)", "(]" or "()"

    def __contains__(self, v: float) -> bool:
        above = self.lo is None or (v > self.lo if self.bounds[0] == "(" else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.bounds[1] == ")" else v <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.bounds[0] == '(' else '>='} {self.lo}"
        return f"in {self.bounds[0]}{self.lo}, {self.hi}{self.bounds[1]}"


# Intervals shared by several fields.
POSITIVE = Range(0, None, "(]")  # learning rates, steps sizes, penalties
NON_NEGATIVE = Range(0)  # weight decays, clips (0: off), penalty weights
SHARE = Range(0, 1, "()")  # a split share: both parts non-empty
FRACTION = Range(0, 1, "[)")  # a held-out share or a rate: 0 is "none", 1 would leave nothing
PIXELS = Range(0, 1, "(]")  # L-inf radius / step in pixel units (images lie in [0, 1])
SEED = Range(0, 2**32 - 1)  # what every RNG (torch, numpy) accepts
EPOCHS = Range(1, 10_000)
BATCH = Range(1, 65_536)
CHANNELS = Range(1, 1_024)
ITERATIONS = Range(1, 10_000)  # attack steps, samples, power iterations
LIMIT = Range(0, 1, "(]")  # a share at or above which something trips

# Closed choices: the single list of allowed values (the library derives its tuples from them).
GradNormMode = Literal["exact", "finite_difference"]
PerturbationEstimate = Literal["first_order", "exact"]
DecodeObjective = Literal["ce", "lagrangian"]
DecodeRule = Literal["quantile", "median", "sample", "perturbation", "perturbation_robust"]
TrainMethod = Literal["standard", "pgd", "trades", "fast"]
Schedule = Literal["cosine", "step"]
Augment = Literal["none", "crop_flip"]
TuneScheduler = Literal["none", "asha"]
SelectMode = Literal["max", "min"]
RetrainImages = Literal["search", "disjoint"]


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how it is split."""

    name: str = "digits"  # a key of rarn.data.DATASETS (digits, cifar10, cifar10-jpeg, ...)
    # download dir (cifar10), ImageFolder root (train/, val/ inside), or where cifar10-jpeg keeps
    # its decoded cache (<root>/cifar10-jpeg-cache/)
    root: str = "data"
    path: str = ""  # the .npz file of cifar10-npz and cifar10-jpeg
    sha256: str = ""  # expected sha256 of `path` (64 hex digits; "": not checked)
    limit: Annotated[int, NON_NEGATIVE] = 0  # first N training images (0: all), class-balanced
    test_limit: Annotated[int, NON_NEGATIVE] = 0  # first N test images (0: all)
    # Which training images the retraining uses: "search", the search's own (the paper's
    # protocol: search and retraining share training images, never test images); "disjoint",
    # the `retrain_limit` images that follow the search's `limit` in the same class-balanced
    # order, never seen by the search (needs limit > 0).
    retrain_images: RetrainImages = "search"
    retrain_limit: Annotated[int, NON_NEGATIVE] = 0  # disjoint: retraining images (0: the rest)
    test_fraction: Annotated[float, SHARE] = 0.2  # held-out test share (sets without a test split)
    train_portion: Annotated[float, SHARE] = 0.5  # D_T share of the search data (rest is D_V)
    image_size: Annotated[int, Range(0, 4_096)] = 0  # resize to this side length (0: native)
    seed: Annotated[int, SEED] = 0  # split seed
    download: bool = False  # allow torchvision to download cifar10


@dataclass(frozen=True)
class SearchConfig:
    """The PC-DARTS-style supernet and the bilevel RACL search (spec §2.2, §2.6, §3)."""

    epochs: Annotated[int, EPOCHS] = 50
    warmup_epochs: Annotated[int, Range(0, 10_000)] = 15  # architecture frozen (PC-DARTS)
    # ... and at least this many weight steps (PC-DARTS waits about 1,470): the architecture
    # moves once the convolutions have learnt, whatever the epochs' length. At or above the
    # search's weight steps: no architecture step at all (the limiting case; decode by
    # perturbation).
    warmup_min_steps: Annotated[int, Range(0, 10**9)] = 0
    batch_size: Annotated[int, BATCH] = 128
    max_steps_per_epoch: Annotated[int, Range(0, 10**9)] = 0  # 0: a full pass over D_T
    init_channels: Annotated[int, CHANNELS] = 16  # a multiple of 2 * partial_channels
    layers: Annotated[int, Range(3, 100)] = 8  # cells; two of them are reductions
    nodes: Annotated[int, Range(1, 16)] = 4  # intermediate nodes per cell
    partial_channels: Annotated[int, Range(1, 64)] = 4  # PC-DARTS K: 1/K enter the mixed op
    lr: Annotated[float, POSITIVE] = 0.1
    lr_min: Annotated[float, NON_NEGATIVE] = 0.001
    momentum: Annotated[float, FRACTION] = 0.9
    weight_decay: Annotated[float, NON_NEGATIVE] = 3e-4
    grad_clip: Annotated[float, NON_NEGATIVE] = 5.0  # 0: no clipping
    arch_lr: Annotated[float, POSITIVE] = 6e-4
    arch_weight_decay: Annotated[float, NON_NEGATIVE] = 1e-3
    arch_beta1: Annotated[float, FRACTION] = 0.5
    arch_beta2: Annotated[float, FRACTION] = 0.999
    sampling: bool = True  # log-normal architecture parameters; False: deterministic (PC-DARTS)
    sigma_init: Annotated[float, POSITIVE] = 0.3
    sigma_min: Annotated[float, POSITIVE] = 1e-3  # <= sigma_max
    sigma_max: Annotated[float, POSITIVE] = 2.0
    grad_norm_weight: Annotated[float, NON_NEGATIVE] = 0.1  # gamma of the input-gradient penalty
    grad_norm_mode: GradNormMode = "finite_difference"
    fd_step: Annotated[float, POSITIVE] = 0.01  # finite-difference step along the input gradient
    # Lazy regularisation (StyleGAN2, Karras et al. 2020, arXiv:1912.04958): the gradient-norm
    # term on every k-th weight step only, weighted k * grad_norm_weight. Default 2 [ours]: on the
    # shared CIFAR subset (8 seeds, paired) the same effect on the weights as every step, at 0.8x
    # the training time (docs/method.md, "Weight step"); 1: the spec's every step.
    grad_norm_every: Annotated[int, Range(1, 1_000)] = 2
    # Collapse (rarn.nas.collapse): a share at or above a limit counts as collapse.
    collapse_param_free_limit: Annotated[float, LIMIT] = 0.5  # normal cell's skip/pool share
    collapse_dominant_limit: Annotated[float, LIMIT] = 0.75  # one op's share of a cell
    collapse_lambda_limit: Annotated[float, LIMIT] = 0.9  # edges on their lowest-lambda op
    # DARTS+ remedy (Liang et al. 2019, arXiv:1909.06035): freeze the architecture once the
    # decoded normal cell's parameter-free share reaches this after an epoch (0: off).
    arch_stop_param_free: Annotated[float, Range(0, 1)] = 0.0
    # The supernet's robustness on D_V (median architecture, eval mode): PGD accuracy
    # `val_pgd_acc`, the pipeline's default selection metric (tune.select_metric). Measured on the
    # first, every k-th and the last epoch; the epochs between carry the last value (0: never).
    robust_eval_every: Annotated[int, Range(0, 10_000)] = 1
    robust_eval_n: Annotated[int, Range(1, 1_000_000)] = 256  # first n images of D_V
    robust_eval_steps: Annotated[int, ITERATIONS] = 5  # PGD steps, step size 2.5 eps / steps
    robust_eval_eps: Annotated[float, PIXELS] = 8 / 255  # set it to the retraining's threat model
    # Decoding (docs/method.md: Decoding): by the magnitude of the distributions (quantile,
    # median, sample) or by perturbation (rarn.nas.perturbation: the rise of the supernet's
    # validation loss, clean or under PGD at robust_eval_eps, when an op or edge is removed,
    # from the eta-quantile architecture). Every search also logs the other decodings.
    decode: DecodeRule = "perturbation"
    decode_samples: Annotated[int, Range(1, 100_000)] = 100  # samples of the majority vote
    decode_n: Annotated[int, Range(1, 1_000_000)] = 256  # first n D_V images of perturbation
    # the loss rise of a removal: "exact" (one pass per op, ~230 passes over decode_n images) or
    # "first_order" (-w dL/dw, one backward pass; blind to removals that BN rescales away,
    # docs/method.md); progressive: project edge by edge (darts-pt)
    decode_estimate: PerturbationEstimate = "exact"
    decode_progressive: bool = False
    # what decides a removal: the validation CE ("ce", darts-pt) or the architecture step's
    # Lagrangian ("lagrangian": the CE's rise plus the bound's, weighed by the search's final
    # multiplier and balance, rarn.nas.selection.constraint_term; the CE alone when the
    # constraint is off or idle at the end). Default decided by docs/constraint.md's 5-seed
    # table: the constraint reaches the genotype (its bound -20 nats vs constraint_off)
    decode_objective: DecodeObjective = "lagrangian"
    # P-DARTS cap (Chen et al. 2019, arXiv:1904.12760) applied when the decoded genotype trips
    # the collapse detector: at most this many parameter-free edges per cell, the others
    # replaced by the best-scored convolution of their edge (-1: off). The uncapped genotype is
    # logged beside it. 3 = the published RACL normal cell's 3 skips of 8; the Lagrangian
    # selection trips the detector on 3 of 5 CIFAR seeds without it (docs/constraint.md)
    decode_max_param_free: Annotated[int, Range(-1, 16)] = 3
    fused: bool = True  # fused supernet forward (same maths as the per-edge reference)
    # bf16 autocast of the network passes on CUDA (ignored on CPU); the bound, the chance
    # constraint and the architecture distribution stay float32 (docs/method.md)
    bf16: bool = False
    channels_last: bool = False  # channels-last supernet and batches (any device)
    seed: Annotated[int, SEED] = 0


@dataclass(frozen=True)
class ConstraintConfig:
    """The chance constraint P(lambda_F <= lambda_bar) >= eta on the log-normal bound (§2.4-2.6)."""

    enabled: bool = True
    eta: Annotated[float, Range(0.5, 1, "[)")] = 0.9  # confidence; >= 0.5 keeps it convex
    # estimator, bound, mixture, threshold, balance: registry names (rarn.nas.constraint's
    # ESTIMATORS, BOUNDS, MIXTURES, THRESHOLDS; rarn.nas.balance's BALANCES), checked there
    estimator: str = "delta"
    mc_samples: Annotated[int, Range(1, 100_000)] = 16  # >= 2 for estimator=monte_carlo
    bound: str = "product"  # the spec's product bound of lambda_F; see docs/constraint.md
    mixture: str = "all"  # ops in the bound's mixture (parametric: a documented variant)
    include_bn: bool = True  # BN scale from running statistics in every lambda_o
    threshold: str = "tracking"  # rarn.nas.constraint.ChanceConstraint
    kappa: Annotated[float, Range(0, 1)] = 0.01  # ln lambda_bar = f_ref - kappa |f_ref|
    # kappa rises linearly from 0 to its value over this share of the architecture steps (0: at
    # once), so the demand keeps growing and the constraint keeps binding [ours, docs/method.md]
    kappa_ramp: Annotated[float, Range(0, 1)] = 0.0
    log_lambda_bar: float = 0.0  # absolute threshold on the (possibly per-node) log-bound
    rho: Annotated[float, POSITIVE] = 0.1  # penalty and dual step (per demand under ce_norm)
    balance: str = "ce_norm"  # constraint gradient vs CE (rarn.nas.balance)
    dual_init: Annotated[float, NON_NEGATIVE] = 0.0
    power_iterations: Annotated[int, Range(1, 1_000)] = 1  # per architecture step


@dataclass(frozen=True)
class RetrainConfig:
    """Adversarial retraining of a discrete genotype (spec §4)."""

    # A bundled genotype, "searched", a path to a genotype JSON file, or a named network
    # (rarn.models.baselines.BASELINES: resnet18, mobilenet_v2, wrn-*).
    genotype: str = "RACL"
    # Reference networks retrained and evaluated beside `genotype` at the same budget, ranked in
    # the summary but never registered: bundled genotypes (RACL, DARTS_V2, PC_DARTS, ...),
    # random-<seed> (a uniform genotype, rarn.space.genotype.random_genotype) or named networks
    # (resnet18, ...; trained without the DARTS-only auxiliary head and drop-path).
    baselines: tuple[str, ...] = ()
    epochs: Annotated[int, EPOCHS] = 100
    batch_size: Annotated[int, BATCH] = 128
    init_channels: Annotated[int, CHANNELS] = 36
    layers: Annotated[int, Range(1, 100)] = 20
    auxiliary_weight: Annotated[float, NON_NEGATIVE] = 0.0  # 0: no auxiliary head
    drop_path: Annotated[float, FRACTION] = 0.0
    lr: Annotated[float, POSITIVE] = 0.1
    lr_min: Annotated[float, NON_NEGATIVE] = 0.0
    momentum: Annotated[float, FRACTION] = 0.9
    weight_decay: Annotated[float, NON_NEGATIVE] = 2e-4
    grad_clip: Annotated[float, NON_NEGATIVE] = 5.0  # 0: no clipping
    schedule: Schedule = "cosine"
    method: TrainMethod = "pgd"
    eps: Annotated[float, PIXELS] = 8 / 255
    step_size: Annotated[float, PIXELS] = 2 / 255
    steps: Annotated[int, Range(1, 1_000)] = 7
    trades_beta: Annotated[float, NON_NEGATIVE] = 6.0
    val_fraction: Annotated[float, FRACTION] = 0.1  # held-out split for best-robust selection
    val_steps: Annotated[int, Range(0, 1_000)] = 3  # PGD steps of the selection (>= 1 if used)
    augment: Augment = "none"  # crop_flip: random crop (pad 4) + horizontal flip (CIFAR)
    bf16: bool = False  # autocast on GPU
    channels_last: bool = False
    # PGD-AT / Fast-AT: the inner maximisation runs on a copy with the batch norms folded into
    # their convolutions (channels-last on CPU), refreshed from the weights before each step:
    # the same eval-mode function, cheaper passes (rarn.models.inference). Off by default: the
    # rounding it changes makes another draw of the trained weights, so a retraining no longer
    # reproduces the earlier code's model bit for bit (docs/method.md)
    fold_batchnorm: bool = False
    seed: Annotated[int, SEED] = 0


@dataclass(frozen=True)
class EvaluationConfig:
    """The attack suite (spec §6.1, docs/evaluation.md).

    The suite is ``attacks`` (registry names, with the shared ``eps``, ``step_size`` and
    ``steps``), then ``suite``: named attacks with their own parameters, e.g.
    ``{name: pgd100, attack: pgd, steps: 100}`` or ``{name: autoattack, attack: autoattack,
    n: 200}`` (``n``: only the first n test images). Both are checked against the attack
    registry by ``rarn.robust.evaluation.named``. The headline is the worst case over all of
    them, on the images every attack saw.
    """

    # keys of rarn.robust.attacks.ATTACKS; the default is the full protocol, standard AutoAttack
    # on every image (the shipped configs put AutoAttack in `suite` with a subset instead)
    attacks: tuple[str, ...] = ("fgsm", "pgd", "mim", "cw", "autoattack")
    suite: tuple[dict[str, Any], ...] = ()  # named attacks: {name, attack, n, <its parameters>}
    eps: Annotated[float, PIXELS] = 8 / 255
    step_size: Annotated[float, PIXELS] = 2 / 255
    steps: Annotated[int, ITERATIONS] = 20
    eps_curve: tuple[Annotated[float, PIXELS], ...] = (2 / 255, 4 / 255, 8 / 255, 16 / 255)
    batch_size: Annotated[int, BATCH] = 256
    autoattack: bool = False  # older switch: append AutoAttack (every image) to `attacks`
    checks: bool = True  # gradient-masking checks (rarn.robust.evaluation.run_masking_checks)
    check_n: Annotated[int, Range(1, 1_000_000)] = 256  # images of the masking checks
    black_box_queries: Annotated[int, Range(1, 1_000_000)] = 500  # the black-box (Square) check
    more_steps_factor: Annotated[int, Range(2, 100)] = 5  # PGD-k vs PGD-(factor * k)
    # when a masking check fires: BPDA / EOT / a longer Square on the images still robust, in the
    # headline (rarn.robust.evaluation.adaptive); the flag is then confirmed or refuted
    adaptive: bool = True
    adaptive_square_queries: Annotated[int, Range(1, 1_000_000)] = 5000
    eot_samples: Annotated[int, ITERATIONS] = 20  # EOT-PGD: forward passes per step
    # attack a copy with every eval-mode BatchNorm folded into the convolution before it
    # (channels-last on CPU): the same function to float rounding, 1.4x faster passes
    # (rarn.models.inference, docs/evaluation.md); false: attack the model exactly as given
    fold_batchnorm: bool = True
    # the transfer matrix (source x target, PGD of the suite) of every evaluated model, once at
    # least two are: a Parquet table and a heatmap on the pipeline's parent run
    transfer: bool = False
    transfer_n: Annotated[int, Range(0, 1_000_000)] = 200  # its first n test images (0: all)
    seed: Annotated[int, SEED] = 0


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune: how many searches, over what, with which resources."""

    num_samples: Annotated[int, Range(1, 256)] = 1
    param_space: dict[str, list] = field(default_factory=dict)  # search./constraint. key -> grid
    cpus_per_trial: Annotated[float, Range(0, 1_024, "(]")] = 1.0
    gpus_per_trial: Annotated[float, Range(0, 64)] = 0.0
    max_concurrent: Annotated[int, Range(0, 1_024)] = 0  # 0: as many as resources allow
    scheduler: TuneScheduler = "none"
    grace_period: Annotated[int, EPOCHS] = 1  # ASHA: epochs before a trial may stop
    max_failures: Annotated[int, Range(0, 100)] = 2
    top_k: Annotated[int, Range(1, 256)] = 1
    select_metric: str = "val_pgd_acc"  # the supernet's PGD accuracy on D_V (search.robust_eval_*)
    select_mode: SelectMode = "max"
    retrain_workers: Annotated[int, Range(1, 1_024)] = 1
    retrain_use_gpu: bool = False
    retrain_cpus_per_worker: Annotated[float, Range(0, 1_024, "(]")] = 1.0  # per Ray Train worker
    storage_path: str = ""  # "" -> <run_dir>/ray
    # Multi-node checks (tracking server, run_dir/storage seen by every node): "auto" when the
    # joined cluster has more than one node alive, "multi-node" always (workers joining later).
    cluster: Literal["auto", "multi-node"] = "auto"


@dataclass(frozen=True)
class StudyConfig:
    """Study mode: named search variants x seeds, every genotype retrained and evaluated alike.

    With ``variants`` set, the search trials are the variants (``rarn.config.variants.VARIANTS``
    names, or names of ``define``) times ``seeds`` (``tune.param_space`` must then be empty);
    every finished trial is retrained (``tune.top_k`` does not apply), ``random-<seed>``
    genotypes join them when ``random_baseline`` is set, and the pipeline writes the per-variant
    table (mean and std over seeds) as Parquet, a plot and MLflow artifacts (docs/constraint.md).
    """

    variants: tuple[str, ...] = ()
    define: dict[str, dict] = field(default_factory=dict)  # own variants: name -> dotted overrides
    seeds: tuple[Annotated[int, SEED], ...] = (0, 1, 2)
    random_baseline: bool = True


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow lineage and registry."""

    tracking_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    experiment: str = "rarn"
    registered_model: str = "rarn-digits"
    alias: str = "champion"  # a Python identifier (MLflow's rule for aliases)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    constraint: ConstraintConfig = field(default_factory=ConstraintConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run_dir: str = "runs/default"
