"""Typed experiment configuration: the schema, dataclasses -> OmegaConf structured configs.

One YAML file per experiment (``configs/*.yaml``) plus ``key=value`` dotlist overrides from the
command line. Every key is typed and every choice is a `Choice` enum (`bootdiff.config.choices`):
an unknown key, a value of the wrong type or a value outside a choice's list is a ``ConfigError``
that names the key and the file (or "command line") it came from. Loading is
`bootdiff.config.load`; the cross-field rules are `bootdiff.config.check`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bootdiff.config.choices import (CorruptionKind, FeatureKind, Fusion, L1Decay, NetKind, Precision, Resize,
                                     SamplerKind, Schedule, Search, SigmaDist, SourceKind, Toggle, ViewKind,
                                     Weighting)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


# ----------------------------------------------------------------------------- building blocks


@dataclass
class NetConfig:
    """Backbone: diffusers UNet2DModel for images, factorised space-time U-Net for clips."""

    kind: NetKind = NetKind.auto  # auto: video for clip views, else unet2d
    channels: List[int] = field(default_factory=lambda: [32, 64])  # block_out_channels
    attention: List[bool] = field(default_factory=lambda: [False, True])  # per resolution level
    layers_per_block: int = 1
    norm_groups: int = 8
    dropout: float = 0.0
    time_scale: float = 250.0  # timestep fed to the U-Net = time_scale * c_noise


@dataclass
class LossConfig:
    """Training noise distribution and loss weighting (EDM, Karras et al. 2022, eq. 8 / Table 1)."""

    sigma_dist: SigmaDist = SigmaDist.lognormal
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    weighting: Weighting = Weighting.edm


@dataclass
class TrainConfig:
    """The framework-agnostic training loop (`bootdiff.train`)."""

    total_kimg: float = 1.0
    batch_size: int = 32
    lr: float = 2e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_kimg: float = 0.1
    grad_clip: float = 1.0  # 0 disables
    accum_steps: int = 1
    ema_halflife_kimg: float = 0.5
    ema_rampup_ratio: float = 0.05  # EDM: half-life at most this fraction of kimg seen so far
    precision: Precision = Precision.auto  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: Toggle = Toggle.auto  # auto: on CUDA
    compile: bool = False
    checkpoint_every_kimg: float = 0.5
    keep_checkpoints: int = 2
    # Early stopping (`bootdiff.stopping.Patience`): stop after this many checkpoints in a row
    # without a lower held-out G, where the run is evaluated at its checkpoints; 0: train to
    # total_kimg (then the cap).
    patience: int = 0
    # checkpoints before this kimg do not count for patience: a pre-training phase on other data
    # (the finetune peer sets it to the end of its pre-training, `bootdiff.config.grid.fix_finetune_schedule`)
    patience_from_kimg: float = 0.0
    report_every: int = 50  # steps between reports to the hooks (stdout, TensorBoard)
    # Seconds between reports that the Ray hooks pass on to ray.train.report (checkpoint reports
    # always go): a report < ~2 s after the previous one blocks training (docs/RAY.md §3).
    report_every_s: float = 5.0
    # Initialisation, σ and noise draws, data order. Unset: the experiment's top-level `seed`
    # (filled by `load_config`), so ``seed=1`` re-runs every model with other random numbers.
    seed: Optional[int] = None
    num_workers: int = 0  # DataLoader workers per training process
    # Non-leaking augmentation (`bootdiff.augment`, EDM Appendix F.2): each training image flipped
    # in x, in y, rotated by quarter turns and shifted, each with this probability, the net told
    # what was done and sampled with none of it. For a scarce image set (full_res, residual; the
    # peers train as full_res does, except patchdiff); 0: off.
    augment: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class ScalingConfig:
    """Ray Train scaling of one view's run (used by ray_jobs only)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources_per_worker: Dict[str, float] = field(default_factory=dict)
    # Ray node labels every worker's node must carry (Ray Train's ScalingConfig.label_selector; nodes
    # get labels with `ray start --labels k=v`): e.g. {node: gpu-a}; {} = any node
    label_selector: Dict[str, str] = field(default_factory=dict)


@dataclass
class ViewConfig:
    """One partial view of the full-resolution data and the model trained on it."""

    kind: ViewKind = ViewKind.patch
    patch_size: int = 16  # patch, clean_patch
    stride: Optional[int] = None  # patch grid stride at evaluation (None: = patch_size)
    per_sample: int = 4  # random crops / clips taken per source sample at ingest
    factor: int = 2  # downsample
    clip_len: int = 8  # clip
    clip_stride: Optional[int] = None  # sliding-window stride at evaluation (None: clip_len // 2)
    # patch: the view's denoiser is told where its patch lies (two coordinate channels,
    # `bootdiff.precond.CoordPrecond`): trained at each crop's recorded location, evaluated at
    # the grid's; off, one denoiser serves every location alike
    coords: bool = False
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


@dataclass
class SourceConfig:
    """Where the raw data comes from (see bootdiff/data/source.py)."""

    kind: SourceKind = SourceKind.mnist
    path: str = ""  # URL of folder / tar / file; "" = the kind's default location
    labels_path: str = ""  # idx: labels file (optional)
    mask_path: str = ""  # corrupted images: folder of masks or JSON boxes file
    num_videos: int = 0  # moving_mnist: how many videos to generate (0 = default)
    num_frames: int = 20  # moving_mnist / clip length of stored videos
    limit: int = 0  # use only the first N source samples (0 = all)
    test_prefixes: List[str] = field(default_factory=list)  # images/tar: basenames starting so = fixed test


@dataclass
class CorruptionConfig:
    """Stamp watermarks / subtitle bands onto images and keep the masks (corruptor)."""

    enabled: bool = False
    kind: CorruptionKind = CorruptionKind.subtitle
    fraction: float = 1.0  # fraction of partial-set images that get corrupted
    seed: int = 0


@dataclass
class LatentConfig:
    """Optional latent space: a local diffusers AutoencoderKL folder (the user's SD VAE)."""

    enabled: bool = False
    vae_path: str = ""
    scaling_factor: Optional[float] = None  # None: the VAE config's scaling_factor
    batch_size: int = 16


@dataclass
class DataConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    resolution: int = 32  # full-resolution side (images are resized/cropped to it)
    channels: int = 1  # 1 = grey, 3 = RGB
    resize: Resize = Resize.error  # rule for mismatched sizes
    num_full: int = 64  # scarce full-resolution training set
    num_test: int = 256  # held-out full-resolution test set: reported, never used to choose
    num_val: int = 32  # held-out full-resolution validation set: the sweep chooses on it (ASHA, best trial)
    num_partial: int = 0  # partial-view set (0 = everything not in full/test)
    # Partial-pool samples held out of every view's training: their view samples are each view's
    # validation split ``<view>-val``, on which a view with ``train.patience`` > 0 is early-stopped
    # and taken at its minimum (0: no such split; every view then trains to its total_kimg)
    num_view_val: int = 0
    split_seed: int = 0
    shard_size: int = 1000  # samples per shard
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)


@dataclass
class ResidualConfig:
    """Stage 2: the residual denoiser trained on the scarce full-resolution set."""

    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mu_var: float = 0.0
    mu_l1: float = 0.0
    l1_decay: L1Decay = L1Decay.none  # inverse_sigma: ℓ1 weight decreasing with σ
    range_adapter: bool = True
    fusion: Fusion = Fusion.auto
    fit_fusion_weights: bool = False
    fusion_sigmas: int = 16  # σ levels (log-spaced over train.loss σ range) of the fitted fusion weights
    # the residual net's output layer starts at zero (`bootdiff.nets.zero_output`): D_boot starts as
    # D_comb instead of D_comb plus r(σ)·(a random net's output)
    zero_init: bool = False
    # σ-gated partial data in stage 2 (the Ambient-Omni gate, `bootdiff.peers.ambient`): per
    # micro-batch, low_ratio · batch_size samples of the low-res view lifted to full resolution
    # (Aᵀ/c) beside the full-res rows, trained only at σ ≥ sigma_tn (0: full-res rows only)
    low_ratio: float = 0.0
    sigma_tn: float = 0.5
    low_view: str = ""  # the downsample view to lift ("": the only one)


@dataclass
class AshaConfig:
    enabled: bool = True
    grace_period: int = 1  # in evaluations (checkpoints) before a trial may be stopped
    reduction_factor: int = 2


@dataclass
class SweepConfig:
    """Stage 2 sweep: grid (or random samples) over μ_var × μ_L1 × range adapter."""

    mu_var: List[float] = field(default_factory=lambda: [0.0, 1.0])
    mu_l1: List[float] = field(default_factory=lambda: [0.0, 0.01])
    range_adapter: List[bool] = field(default_factory=lambda: [True])
    search: Search = Search.grid
    num_samples: int = 1  # random: trials; grid: repeats of the grid
    asha: AshaConfig = field(default_factory=AshaConfig)
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    trial_resources: Dict[str, float] = field(default_factory=dict)
    trial_label_selector: Dict[str, str] = field(default_factory=dict)  # node labels of residual trials' workers
    max_concurrent: int = 0  # 0 = as many as resources allow
    baseline_combined: bool = True  # the combined denoiser alone, no residual
    baseline_full_res: bool = True  # a model trained on the scarce full-res set alone
    # peer methods trained as baselines of this sweep (`bootdiff.peers`: ambient, finetune,
    # patchdiff), each at every setting of its ``peers.<name>.grid``, with ``full_res``'s net and
    # training (its patience too); the sweep recommends the model with the lowest validation G
    peers: List[str] = field(default_factory=list)
    # the bootstrapped model averaged with the best peer (`bootdiff.ensemble`): the weights of the
    # bootstrapped model tried, the one of lowest validation G kept; the ensemble is one more
    # candidate for the recommendation. [] for none; without a peer or a validation split there is none.
    ensemble: List[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])


@dataclass
class SamplerConfig:
    kind: SamplerKind = SamplerKind.heun
    schedule: Schedule = Schedule.edm
    steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    snr: float = 0.1  # predictor-corrector Langevin step
    n_corrector: int = 1


@dataclass
class FeaturesConfig:
    """Fréchet distance's feature network, read from the user's disk only (`bootdiff.evaluation.fd`,
    docs/METHOD.md §8); `bootdiff.config.check` loads it once at config load."""

    kind: FeatureKind = FeatureKind.none  # none: FD is skipped, with a one-line note in the report
    path: Optional[str] = None  # inception: state-dict .pth file; dinov2: save_pretrained folder
    batch_size: int = 64  # images per forward pass of the feature network


@dataclass
class EvalConfig:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    num_sigma: int = 12
    seed: int = 0
    delta: float = 0.1  # report the (1-δ) quantile of per-sample error
    max_samples: int = 256  # held-out / train samples scored
    batch_size: int = 64
    num_images: int = 16  # samples drawn per model for the report
    # CPUs of the evaluation task (ray_jobs/evaluate.py; its torch threads): 0 = a sweep trial's
    # (sweep.trial_cpus). It runs alone after the sweep, so a one-machine run can give it the machine
    num_cpus: float = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    # a data-efficiency benchmark's output folder (benchmarks/data_efficiency.py --out) measured on
    # this config's data: the report quotes what it measured each model worth in full-res images at
    # this run's N (`bootdiff.evaluation.worth`; checked at load); "" = none
    benchmark: str = ""


@dataclass
class RayConfig:
    address: str = ""  # "" = RAY_ADDRESS or a new local cluster
    max_failures: int = 2  # FailureConfig retries per Train run
    ingest_tasks: int = 0  # 0 = one task per shard range
    train_state_tracking: bool = True
    inject_failure_step: int = -1  # testing FailureConfig: a worker raises once at this step
    # the Train runs that inject it (view names, "full_res", a peer's name, "distill"); [] = all of them
    inject_failure_runs: List[str] = field(default_factory=list)
    # testing node loss: rank 0 of each Train run (views, baselines, peers, residual trials) waits
    # this many seconds after its first checkpoint report, on its first attempt only, so that a
    # test can lose the run's node mid-run however fast the machine trains; 0 = never
    inject_pause_s: float = 0
    # >0: seconds Ray Train waits for a worker group to be placed before `fit_retrying` checks
    # whether any live node can take it (fails naming the key if none can, else waits again);
    # 0 keeps Ray's 60 s (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S)
    worker_start_timeout_s: float = 0
    train_log_level: str = "WARNING"  # Ray Train's own console logs (INFO: a line per report and checkpoint)
    # a local-path storage on a cluster of more than one node is refused (ray_jobs/cluster.py) unless
    # this declares it a folder every node mounts (NFS, a shared volume)
    shared_storage: bool = False


@dataclass
class DistillConfig:
    """Optional last stage (`bootdiff.distill`, docs/METHOD.md §9): one full-resolution student
    distilled from the sweep's best model, exported as a diffusers pipeline."""

    enabled: bool = False
    net: NetConfig = field(default_factory=lambda: NetConfig(kind=NetKind.unet2d))  # unet2d: exportable
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    num_teacher_samples: int = 256  # teacher samples written as shards before training
    teacher_fraction: float = 0.5  # share of each training batch drawn from the teacher samples
    real_weight: float = 0.5  # + real_weight · EDM loss on the real rows (0.5:0.5 best on 2 seeds, RESULTS.md)
    sampler_steps: int = 18  # eval.sampler with this many steps draws the teacher samples
    shard_size: int = 64  # teacher samples per shard (one Ray task writes a few shards)


@dataclass
class AmbientConfig:
    """One full-res network trained the Ambient Diffusion Omni way (Daras et al. 2025; a peer of
    the bootstrap, `bootdiff.peers.ambient`): the scarce full-res images at every σ, the low-res
    view's samples lifted to full resolution (Aᵀ/c) only at σ ≥ ``sigma_tn``, the patch view's
    crops (at their own size) only at σ ≤ ``sigma_crop``. Net and training: ``full_res``'s."""

    sigma_tn: float = 0.5  # lifted low-res samples only at σ >= this (their missing detail drowns)
    sigma_crop: float = 0.5  # crops only at σ <= this (the denoiser is local there)
    low_share: float = 0.5  # share of each micro-batch's full-size rows that are lifted low-res samples
    crop_ratio: float = 1.0  # crops per micro-batch, as a multiple of full_res.train.batch_size (0: none)
    low_view: str = ""  # the downsample view to lift ("": the only one)
    crop_view: str = ""  # the patch view to crop from ("": the only one)
    grid: List[float] = field(default_factory=list)  # sigma_tn values tried on validation ([]: sigma_tn)


@dataclass
class FinetuneConfig:
    """Pre-train and fine-tune (a peer of the bootstrap, `bootdiff.peers.finetune`): one full-res
    network pre-trained on the low-res view's samples lifted to full resolution (every σ), then
    fine-tuned on the full-res images. Net and training: ``full_res``'s."""

    pretrain_share: float = 0.5  # share of the run's optimizer steps spent pre-training
    # > 0: the pre-training phase in kimg instead (`bootdiff.config.grid.fix_finetune_schedule` sets it from the cap, so
    # that a model trained to where its selection run stopped switches where that run did)
    pretrain_kimg: float = 0.0
    low_view: str = ""  # the downsample view to lift ("": the only one)
    grid: List[float] = field(default_factory=list)  # pretrain_share values tried on validation ([]: pretrain_share)


@dataclass
class PatchDiffConfig:
    """Patch Diffusion (Wang et al. 2023; a peer of the bootstrap, `bootdiff.peers.patchdiff`): one
    full-res network with two coordinate input channels, trained per micro-batch on whole images
    (``full_share``), the patch view's samples at their recorded locations (``patch_share``), or
    random crops of the full-res images (the rest). Net and training: ``full_res``'s."""

    full_share: float = 0.5  # micro-batches of whole full-res images
    patch_share: float = 0.25  # micro-batches of the partial pool's patches, at their locations
    crop_sizes: List[int] = field(default_factory=list)  # random crops' sides ([]: half the image side)
    patch_view: str = ""  # the patch view ("": the only one)
    grid: List[float] = field(default_factory=list)  # full_share values tried on validation ([]: full_share)


@dataclass
class PeersConfig:
    """Peer methods: one ordinary network trained on the same full-res and partial data."""

    ambient: AmbientConfig = field(default_factory=AmbientConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    patchdiff: PatchDiffConfig = field(default_factory=PatchDiffConfig)


@dataclass
class ExperimentConfig:
    name: str = "bootdiff"
    storage: str = "./bootdiff_runs"  # URL root: shards, checkpoints, sweep results, report
    # Every model's `train.seed` left unset (views, full_res, residual, distill) and the random
    # search's draws. Not the data split (`data.split_seed`) nor G's fixed noise (`eval.seed`).
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    views: Dict[str, ViewConfig] = field(default_factory=dict)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    # The full-res baseline. Its train.total_kimg left unset (MISSING) is filled at load with
    # `full_res_budget`: the kimg the bootstrapped model stands on, so the comparison is fair.
    full_res: ViewConfig = field(default_factory=lambda: ViewConfig(
        kind=ViewKind.full, train=TrainConfig(total_kimg=MISSING)))  # type: ignore[arg-type]
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)


# ----------------------------------------------------------------------------- reading and writing


def _error(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"{origin}: bad config key '{key}': {msg}")


def structured(schema: type = ExperimentConfig) -> DictConfig:
    """An empty typed config of the schema, with every default filled in."""
    return OmegaConf.structured(schema)


def full_res_budget(cfg) -> float:
    """The full-res baseline's default budget in kimg: every view model's ``train.total_kimg``
    plus the residual's, the training the bootstrapped model stands on (a fair baseline)."""
    return float(sum(v.train.total_kimg for v in cfg.views.values()) + cfg.residual.train.total_kimg)


def to_object(cfg: Any) -> Any:
    """The dataclass instance behind a structured config (or the value itself)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_object(cfg)
    return cfg


def to_yaml(cfg: Any) -> str:
    """Resolved YAML text of a config (dataclass or DictConfig)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_yaml(text: str, schema: type) -> Any:
    """Parse YAML text produced by ``to_yaml`` back into the schema's dataclass."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(text)))
    except OmegaConfBaseException as exc:
        raise _error(exc, "<yaml text>") from None
