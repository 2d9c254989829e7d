"""Typed experiment configuration: dataclasses -> OmegaConf structured configs.

One YAML file per experiment (``configs/*.yaml``) plus ``key=value`` dotlist overrides from the
command line. Every key is typed: an unknown key or a value of the wrong type is a
``ConfigError`` that names the key and the file (or "command line") it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


# ----------------------------------------------------------------------------- building blocks


@dataclass
class NetConfig:
    """Backbone: diffusers UNet2DModel for images, factorised space-time U-Net for clips."""

    kind: str = "auto"  # auto | unet2d | video  (auto: video for clip views, else unet2d)
    channels: List[int] = field(default_factory=lambda: [32, 64])  # block_out_channels
    attention: List[bool] = field(default_factory=lambda: [False, True])  # per resolution level
    layers_per_block: int = 1
    norm_groups: int = 8
    dropout: float = 0.0
    time_scale: float = 250.0  # timestep fed to the U-Net = time_scale * c_noise


@dataclass
class LossConfig:
    """Training noise distribution and loss weighting (EDM, Karras et al. 2022, eq. 8 / Table 1)."""

    sigma_dist: str = "lognormal"  # lognormal | loguniform
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    weighting: str = "edm"  # edm (bell-shaped) | snr | uniform


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
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    channels_last: str = "auto"  # auto (on CUDA) | true | false
    compile: bool = False
    checkpoint_every_kimg: float = 0.5
    keep_checkpoints: int = 2
    report_every: int = 50  # steps between hook reports (Ray reports cost ~2 s each)
    seed: int = 0
    num_workers: int = 0  # DataLoader workers per training process
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class ScalingConfig:
    """Ray Train scaling of one view's run (used by ray_jobs only)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources_per_worker: Dict[str, float] = field(default_factory=dict)


@dataclass
class ViewConfig:
    """One partial view of the full-resolution data and the model trained on it."""

    kind: str = "patch"  # patch | downsample | clip | clean_patch | full
    patch_size: int = 16  # patch, clean_patch
    stride: Optional[int] = None  # patch grid stride at evaluation (None: = patch_size)
    per_sample: int = 4  # random crops / clips taken per source sample at ingest
    factor: int = 2  # downsample
    clip_len: int = 8  # clip
    clip_stride: Optional[int] = None  # sliding-window stride at evaluation (None: clip_len // 2)
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


@dataclass
class SourceConfig:
    """Where the raw data comes from (see bootdiff/data/source.py)."""

    kind: str = "mnist"  # mnist | fashion_mnist | idx | images | tar | video | frames | moving_mnist
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
    kind: str = "subtitle"  # subtitle | watermark
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
    resize: str = "error"  # error | resize | center_crop  (rule for mismatched sizes)
    num_full: int = 64  # scarce full-resolution training set
    num_test: int = 256  # held-out full-resolution test set
    num_partial: int = 0  # partial-view set (0 = everything not in full/test)
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
    l1_decay: str = "none"  # none | inverse_sigma  (ℓ1 weight decreasing with σ)
    range_adapter: bool = True
    fusion: str = "auto"  # auto | split | average
    fit_fusion_weights: bool = False


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
    search: str = "grid"  # grid | random
    num_samples: int = 1  # random: trials; grid: repeats of the grid
    asha: AshaConfig = field(default_factory=AshaConfig)
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    trial_resources: Dict[str, float] = field(default_factory=dict)
    max_concurrent: int = 0  # 0 = as many as resources allow
    baseline_combined: bool = True  # the combined denoiser alone, no residual
    baseline_full_res: bool = True  # a model trained on the scarce full-res set alone


@dataclass
class SamplerConfig:
    kind: str = "heun"  # heun | euler_maruyama | pc
    schedule: str = "edm"  # edm (ρ-polynomial) | ve (exponential, Song et al.) | linear
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
class EvalConfig:
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    num_sigma: int = 12
    seed: int = 0
    delta: float = 0.1  # report the (1-δ) quantile of per-sample error
    max_samples: int = 256  # held-out / train samples scored
    batch_size: int = 64
    num_images: int = 16  # samples drawn per model for the report
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class RayConfig:
    address: str = ""  # "" = RAY_ADDRESS or a new local cluster
    max_failures: int = 2  # FailureConfig retries per Train run
    ingest_tasks: int = 0  # 0 = one task per shard range
    train_state_tracking: bool = True
    inject_failure_step: int = -1  # testing FailureConfig: a worker raises once at this step
    worker_start_timeout_s: float = 0  # >0: fail (not hang) when a worker group can't be scheduled


@dataclass
class ExperimentConfig:
    name: str = "bootdiff"
    storage: str = "./bootdiff_runs"  # URL root: shards, checkpoints, sweep results, report
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    views: Dict[str, ViewConfig] = field(default_factory=dict)
    residual: ResidualConfig = field(default_factory=ResidualConfig)
    full_res: ViewConfig = field(default_factory=lambda: ViewConfig(kind="full"))  # baseline
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ----------------------------------------------------------------------------- loading


def _error(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"{origin}: bad config key '{key}': {msg}")


def structured(schema: type = ExperimentConfig) -> DictConfig:
    """An empty typed config of the schema, with every default filled in."""
    return OmegaConf.structured(schema)


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                schema: type = ExperimentConfig) -> DictConfig:
    """Load ``path`` (YAML, any fsspec URL) over the schema's defaults, then apply ``overrides``.

    Raises ``ConfigError`` naming the key and the file (or the command line) for an unknown key,
    a value of the wrong type, or malformed YAML.
    """
    cfg = structured(schema)
    if path:
        from bootdiff.util import url_fs

        fs, p = url_fs(path)
        if not fs.exists(p):
            raise ConfigError(f"config file not found: {path}")
        with fs.open(p, "r") as f:
            text = f.read()
        try:
            loaded = OmegaConf.create(text)
        except Exception as exc:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: cannot parse YAML: {exc}") from None
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as exc:
            raise _error(exc, path) from None
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"command line: override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise _error(exc, "command line") from None
    return cfg


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
