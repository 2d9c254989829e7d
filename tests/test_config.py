"""Typed configs: every shipped config loads; errors name the key and the file; cluster files
carry the fields the pipeline relies on."""

import glob
import os

import pytest
import yaml

from bootdiff.config import ConfigError, ExperimentConfig, from_yaml, load_config, to_object, to_yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_configs_load_and_round_trip(path):
    cfg = to_object(load_config(path))
    assert isinstance(cfg, ExperimentConfig) and cfg.views
    for name, v in cfg.views.items():
        assert v.kind in ("patch", "downsample", "clip", "clean_patch", "full"), name
    assert from_yaml(to_yaml(cfg), ExperimentConfig) == cfg


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  resolution: 32\n  resolutoin: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "data.resolutoin" in str(e.value) and str(p) in str(e.value)


def test_ill_typed_value_in_file_and_nested_view(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("views:\n  patch:\n    kind: patch\n    train:\n      batch_size: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "views.patch.train.batch_size" in str(e.value) and str(p) in str(e.value)


def test_overrides_are_typed_and_errors_name_the_command_line():
    cfg = load_config(os.path.join(REPO, "configs", "quickstart.yaml"),
                      ["sweep.mu_var=[0,0.5]", "views.low.factor=4", "eval.sampler.kind=pc"])
    assert list(cfg.sweep.mu_var) == [0.0, 0.5] and cfg.views.low.factor == 4 and cfg.eval.sampler.kind == "pc"
    with pytest.raises(ConfigError, match=r"command line.*'views.low.net.channels'"):
        load_config(os.path.join(REPO, "configs", "quickstart.yaml"), ["views.low.net.channels=abc"])
    with pytest.raises(ConfigError, match="'sweep.mu_vra'"):
        load_config(None, ["sweep.mu_vra=[1]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["sweep.mu_var"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    p = tmp_path / "broken.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(p))


def test_cluster_launcher_yaml_has_what_the_pipeline_needs():
    c = yaml.safe_load(open(os.path.join(REPO, "cluster", "aws-gpu.yaml")))
    assert c["provider"]["type"] == "aws"
    workers = [t for t in c["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert workers, "no GPU worker type"
    assert c["head_node_type"] in c["available_node_types"]
    assert any("pip install" in s and "-e ." in s for s in c["setup_commands"])  # project installed
    assert any("ray start --head" in s for s in c["head_start_ray_commands"])
    assert any("RAY_TRAIN_ENABLE_STATE_TRACKING=1" in s for s in c["head_start_ray_commands"])
    assert any("ray start --address" in s for s in c["worker_start_ray_commands"])
    for t in c["available_node_types"].values():  # S3 storage through the instance profile
        assert t["node_config"]["IamInstanceProfile"]["Name"]


def test_kuberay_rayjob_runs_the_pipeline():
    j = yaml.safe_load(open(os.path.join(REPO, "cluster", "kuberay-rayjob.yaml")))
    assert j["apiVersion"].startswith("ray.io/") and j["kind"] == "RayJob"
    spec = j["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "ray_jobs.pipeline"]
    cfg_path = entry[entry.index("--config") + 1]
    overrides = [e for e in entry[entry.index("--config") + 2:]]
    cfg = load_config(os.path.join(REPO, cfg_path), overrides)  # the config and overrides are valid
    assert str(cfg.storage).startswith("s3://")
    rc = spec["rayClusterSpec"]
    assert rc["rayVersion"] == "2.60.0"
    assert rc["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in rc["workerGroupSpecs"]]
    assert any(gpus)
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
