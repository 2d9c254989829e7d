"""The experiment config: its typed schema, its choices, loading and the load-time checks.

- `bootdiff.config.choices`: the `Choice` enums of the fixed-list fields (view kinds, samplers, …);
- `bootdiff.config.schema`: the dataclasses (`ExperimentConfig` and its blocks), YAML in and out;
- `bootdiff.config.check`: the cross-field rules, checked at load;
- `bootdiff.config.load`: `load_config`, file + ``key=value`` overrides + `check`.

The names most code needs are importable from here (``from bootdiff.config import load_config``).
"""

from bootdiff.config.choices import (VIDEO_SOURCES, Choice, CorruptionKind, FeatureKind, Fusion, L1Decay,  # noqa: F401
                                     NetKind, Precision, Resize, SamplerKind, Schedule, Search, SigmaDist,
                                     SourceKind, Toggle, ViewKind, Weighting)
from bootdiff.config.schema import (AmbientConfig, AshaConfig, ConfigError, CorruptionConfig, DataConfig, FinetuneConfig,  # noqa: F401
                                    DistillConfig, EvalConfig, ExperimentConfig, FeaturesConfig, LatentConfig,
                                    LossConfig, NetConfig, PatchDiffConfig, PeersConfig, RayConfig, ResidualConfig, SamplerConfig,
                                    ScalingConfig, SourceConfig, SweepConfig, TrainConfig, ViewConfig,
                                    from_yaml, full_res_budget, structured, to_object, to_yaml)
from bootdiff.config.load import load_config  # noqa: F401
