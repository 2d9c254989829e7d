"""Typed configs: every shipped config loads; errors name the key and the file; every config
mistake the config alone reveals fails at load (choices typed, cross-field rules checked, no view
added by a typo), also through the pipeline's entry point; cluster files carry the fields the
pipeline relies on."""

import glob
import json
import os
import resource
import subprocess
import sys
import time

import pytest
import yaml

from bootdiff import config as config_module
from bootdiff.config import (Choice, ConfigError, ExperimentConfig, ViewKind, from_yaml, load_config,
                             to_object, to_yaml)

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


def test_dockerfile_builds_the_image_the_rayjob_names():
    """cluster/Dockerfile (not built here: no Docker daemon, no registry) against what it must agree
    with: the RayJob's image and working_dir, the pinned Ray version, the project's torch range,
    the code the jobs import, and nothing of the test extras."""
    import re

    j = yaml.safe_load(open(os.path.join(REPO, "cluster", "kuberay-rayjob.yaml")))
    rc = j["spec"]["rayClusterSpec"]
    images = {c["image"] for g in [rc["headGroupSpec"], *rc["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    docker = open(os.path.join(REPO, "cluster", "Dockerfile")).read()
    tag = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", docker).group(1)
    assert images == {tag} == {"bootdiff:latest"}
    assert f"docker build -f cluster/Dockerfile -t {tag} ." in open(os.path.join(REPO, "cluster", "kuberay-rayjob.yaml")).read()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)", docker, re.M)
    pyproject = open(os.path.join(REPO, "pyproject.toml")).read()
    assert base.group(1) == rc["rayVersion"] and f'"ray[train,tune,default]=={base.group(1)}"' in pyproject
    workdir = re.search(r"^WORKDIR (\S+)", docker, re.M).group(1)
    assert yaml.safe_load(j["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    torch_pin = re.search(r'"torch==([\d.]+)"', docker).group(1)
    low, high = re.search(r'"torch>=([\d.]+),<([\d.]+)"', pyproject).groups()
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(torch_pin) < as_tuple(high)
    for folder in ("bootdiff", "ray_jobs", "configs"):  # what the entrypoint imports and reads
        assert re.search(rf"^COPY \S* ?{folder} \./{folder}$", docker, re.M), folder
    assert "[test]" not in docker and ".venv/" in open(os.path.join(REPO, ".dockerignore")).read()


# ----------------------------------------------------------------------------- choices


CHOICES = [c for c in vars(config_module).values()
           if isinstance(c, type) and issubclass(c, Choice) and c is not Choice]


def test_choices_are_plain_strings_everywhere():
    assert len(CHOICES) >= 14
    for cls in CHOICES:
        for m in cls:
            # named by their value: OmegaConf looks members up by name, YAML writes the name
            assert m.name == m.value and m == m.value and hash(m) == hash(m.value)
            assert str(m) == m.value and f"{m}" == m.value and f"{m:>3}" == format(m.value, ">3")
            assert json.dumps({"k": m}) == json.dumps({"k": m.value})
    cfg = to_object(load_config(os.path.join(REPO, "configs", "quickstart.yaml")))
    assert isinstance(cfg.views["patch"].kind, ViewKind) and cfg.views["patch"].kind == "patch"
    text = to_yaml(cfg)
    assert "kind: patch" in text and "fusion: auto" in text and "ViewKind" not in text
    assert {"patch": 1}[cfg.views["patch"].kind] == 1


def test_channels_last_accepts_yaml_booleans(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("views:\n  v:\n    kind: full\n    train: {channels_last: false}\n")
    cfg = load_config(str(p), ["residual.train.channels_last=true"])
    assert cfg.views.v.train.channels_last == "false" and cfg.residual.train.channels_last == "true"
    with pytest.raises(ConfigError, match="'residual.train.channels_last'.*maybe"):
        load_config(str(p), ["residual.train.channels_last=maybe"])


# ----------------------------------------------------------------------------- mistakes at load


QUICK = os.path.join(REPO, "configs", "quickstart.yaml")
MOVING = os.path.join(REPO, "configs", "moving_mnist.yaml")

# (config, bad override, the key the error must name) — each fails at load, naming the key
MISTAKES = [
    (QUICK, "eval.sampler.kind=foo", "eval.sampler.kind"),
    (QUICK, "eval.sampler.schedule=cosine", "eval.sampler.schedule"),
    (QUICK, "residual.fusion=bogus", "residual.fusion"),
    (QUICK, "peers.ambient.sigma_tn=0", "peers.ambient.sigma_tn"),
    (QUICK, "peers.ambient.low_share=1.0", "peers.ambient.low_share"),
    (QUICK, "peers.ambient.low_view=patch", "peers.ambient.low_view"),
    (QUICK, "peers.ambient.grid=[0.5,0]", "peers.ambient.grid"),
    (QUICK, "sweep.peers=[bogus]", "sweep.peers"),
    (QUICK, "sweep.peers=[ambient,ambient]", "sweep.peers"),
    (MOVING, "sweep.peers=[ambient]", "sweep.peers"),  # clips only: no low-res copies, no patches
    (QUICK, "peers.finetune.pretrain_share=1", "peers.finetune.pretrain_share"),
    (QUICK, "peers.finetune.grid=[0.5,1.5]", "peers.finetune.grid"),
    (QUICK, "peers.patchdiff.full_share=0.9", "peers.patchdiff.full_share"),
    (QUICK, "peers.patchdiff.crop_sizes=[64]", "peers.patchdiff.crop_sizes"),
    (QUICK, "peers.patchdiff.patch_view=low", "peers.patchdiff.patch_view"),
    (QUICK, "full_res.train.patience=-1", "full_res.train.patience"),
    (QUICK, "residual.l1_decay=exp", "residual.l1_decay"),
    (QUICK, "sweep.search=x", "sweep.search"),
    (QUICK, "views.patch.kind=square", "views.patch.kind"),
    (QUICK, "views.patch.net.kind=transformer", "views.patch.net.kind"),
    (QUICK, "views.patch.train.loss.sigma_dist=cosine", "views.patch.train.loss.sigma_dist"),
    (QUICK, "residual.train.loss.weighting=flat", "residual.train.loss.weighting"),
    (QUICK, "full_res.train.precision=fp16", "full_res.train.precision"),
    (QUICK, "data.source.kind=parquet", "data.source.kind"),
    (QUICK, "data.corruption.kind=stamp", "data.corruption.kind"),
    (QUICK, "data.resize=stretch", "data.resize"),
    (QUICK, "views.patch.patch_size=64", "views.patch.patch_size"),  # patch larger than 32x32
    (QUICK, "views.low.factor=3", "views.low.factor"),  # does not divide 32
    (QUICK, "views.low.factor=0", "views.low.factor"),
    (MOVING, "views.clip.clip_len=21", "views.clip.clip_len"),  # videos have 20 frames
    (QUICK, "views.low.kind=clip", "views.low"),  # clips of images
    (QUICK, "views.patch.train.batch_size=0", "views.patch.train.batch_size"),
    (QUICK, "residual.train.total_kimg=0", "residual.train.total_kimg"),
    (QUICK, "full_res.train.lr=-1", "full_res.train.lr"),
    (QUICK, "views.low.train.checkpoint_every_kimg=-1", "views.low.train.checkpoint_every_kimg"),
    (QUICK, "views.low.scaling.num_workers=0", "views.low.scaling.num_workers"),
    (QUICK, "data.num_full=0", "data.num_full"),
    (QUICK, "data.num_test=0", "data.num_test"),
    (QUICK, "data.num_val=0", "data.num_val"),  # the sweep would have to choose on the test split
    (QUICK, "data.num_val=-1", "data.num_val"),
    (QUICK, "ray.train_log_level=LOUD", "ray.train_log_level"),
    (QUICK, "ray.inject_failure_runs=[patch,hi]", "ray.inject_failure_runs"),
    (QUICK, "data.num_full=6000", "data.num_full"),  # + num_test > data.source.limit=6000
    (QUICK, "data.source.mask_path=/masks", "data.source.mask_path"),  # only images/tar read masks
    (QUICK, "residual.fusion=split", "residual.fusion"),  # with 'low' made a patch view below
    (QUICK, "sweep.mu_var=[]", "sweep.mu_var"),
    (QUICK, "sweep.mu_l1=[0,-1]", "sweep.mu_l1"),
    (QUICK, "sweep.asha.reduction_factor=1", "sweep.asha.reduction_factor"),
    (QUICK, "eval.delta=0", "eval.delta"),
    (QUICK, "eval.sampler.steps=0", "eval.sampler.steps"),
    (QUICK, "eval.sigma_max=0.001", "eval.sigma_max"),
    (MOVING, "residual.net.kind=unet2d", "residual.net.kind"),  # a 2-D U-Net on videos
    (QUICK, "full_res.kind=patch", "full_res.kind"),
    (QUICK, "views.full.kind=full", "views.full"),  # reserved name
]


@pytest.mark.parametrize("path,override,key", MISTAKES, ids=[m[1] for m in MISTAKES])
def test_each_mistake_fails_at_load_naming_key_and_command_line(path, override, key):
    extra = ["views.low.kind=patch", "sweep.peers=[]"] if override == "residual.fusion=split" else []
    base = to_object(load_config(path, extra))  # the config without the mistake is valid
    assert base.views
    t = time.time()
    with pytest.raises(ConfigError) as e:
        load_config(path, [override, *extra])
    first = str(e.value).splitlines()[0]
    assert first.startswith("command line: ") and key in first, str(e.value)
    assert time.time() - t < 10


def test_validation_split_is_needed_only_to_choose():
    # one residual setting: nothing to choose, so no validation split is needed
    one = ["sweep.mu_var=[1.0]", "sweep.mu_l1=[0.0]", "sweep.range_adapter=[true]", "data.num_val=0"]
    assert to_object(load_config(QUICK, one)).data.num_val == 0
    with pytest.raises(ConfigError, match=r"data.num_val=0: the sweep chooses among 2 residual settings"):
        load_config(QUICK, [*one[:2], "sweep.range_adapter=[true,false]", "data.num_val=0"])


def test_mistake_in_file_names_the_file_and_all_problems(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("data: {resolution: 32}\nviews:\n  patch: {kind: patch, patch_size: 48}\n"
                 "  low: {kind: downsample, factor: 5}\neval: {delta: 1.5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    for key in ("views.patch.patch_size=48", "views.low.factor=5", "eval.delta=1.5"):
        assert f"{p}: {key}" in msg, msg
    with pytest.raises(ConfigError, match=r"^command line: views.patch.patch_size=40"):
        load_config(str(p), ["views.patch.patch_size=40", "views.low.factor=2", "eval.delta=0.1"])
    assert load_config(str(p), ["views.patch.patch_size=16", "views.low.factor=2", "eval.delta=0.1"])
    assert load_config(str(p), ["views.patch.patch_size=16"], check=False).views.low.factor == 5


def test_override_adds_a_view_only_with_a_kind():
    with pytest.raises(ConfigError) as e:
        load_config(QUICK, ["views.lwo.train.total_kimg=1"])
    msg = str(e.value)
    assert "'lwo'" in msg and "views.lwo.train.total_kimg=1" in msg and "patch, low" in msg
    with pytest.raises(ConfigError, match="unknown view 'ptach'"):
        load_config(QUICK, ["views.ptach={patch_size: 8}"])
    with pytest.raises(ConfigError, match=r"sweep.peers=\[ambient\].*the one peers.ambient.low_view"):
        load_config(QUICK, ["sweep.peers=[ambient]", "views.lwo.kind=downsample", "views.lwo.factor=4"])  # which one?
    cfg = load_config(QUICK, ["sweep.peers=[ambient]", "views.lwo.kind=downsample", "views.lwo.factor=4",
                              "views.lwo.train.total_kimg=1", "peers.ambient.low_view=low"])
    assert set(cfg.views) == {"patch", "low", "lwo"} and cfg.views.lwo.kind == "downsample"
    assert cfg.views.lwo.train.total_kimg == 1
    cfg = load_config(QUICK, ["views.low.train.total_kimg=1"])  # an existing view: no kind needed
    assert cfg.views.low.train.total_kimg == 1 and set(cfg.views) == {"patch", "low"}


def test_latent_views_are_checked_in_latent_pixels(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"latent_channels": 4, "block_out_channels": [8, 16, 16]}))
    over = ["data.latent.enabled=true", f"data.latent.vae_path={vae}", "views.patch.patch_size=8"]
    assert load_config(QUICK, over).views.patch.patch_size == 8  # 32 px -> 8x8 latents
    with pytest.raises(ConfigError, match=r"views.patch.patch_size=16: larger than the data's 8x8"):
        load_config(QUICK, over[:2] + ["views.patch.patch_size=16"])


def test_pipeline_entry_point_fails_fast_and_writes_nothing(tmp_path):
    storage = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.pipeline", "--config", QUICK,
                           f"storage={storage}", "eval.sampler.kind=foo"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.time() - t
    assert proc.returncode == 2, proc.stderr
    assert "[bootdiff] ERROR:" in proc.stderr and "eval.sampler.kind" in proc.stderr and "foo" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 2, proc.stderr
    assert not storage.exists() and os.listdir(tmp_path) == []  # nothing written, Ray not started
    # CPU seconds of the failed run (imports + load): wall time on a shared 2-core box mostly
    # measures the other processes (seen: 3.9 s CPU in 20 s wall at load average 7.5).
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 10, f"{cpu:.1f} s CPU ({wall:.1f} s wall)"


@pytest.fixture
def no_ray_left():
    """`entry.main` joins Ray (here: starts a local cluster) before the run's lease; a process
    exits after it, this test's does not: disconnect so the tests after it can ``ray.init``."""
    yield
    import ray

    ray.shutdown()


def test_a_users_mistake_is_one_paragraph_and_exit_2_a_bug_keeps_its_traceback(tmp_path, capsys, no_ray_left):
    from ray_jobs import entry

    ran = []
    job = lambda cfg, cfg_yaml: ran.append(cfg) or {"ok": 1}  # noqa: E731
    quick = "configs/quickstart.yaml"
    # A config value at fault: named, no traceback, exit 2, nothing run or written.
    assert entry.main(job, "", ["--config", quick, f"storage={tmp_path}/s", "data.num_full=0"]) == 2
    err = capsys.readouterr().err
    assert "[bootdiff] ERROR: command line: data.num_full=0" in err and "Traceback" not in err
    assert not ran and not os.path.exists(tmp_path / "s")
    # A storage that cannot be written: the URL named before any work.
    assert entry.main(job, "", ["--config", quick, "storage=/proc/nope"]) == 2
    err = capsys.readouterr().err
    assert "storage '/proc/nope' cannot be written" in err and "storage=" in err and not ran
    # --debug: the same mistake raises with its traceback.
    with pytest.raises(ConfigError, match="data.num_full"):
        entry.main(job, "", ["--config", quick, "--debug", f"storage={tmp_path}/s", "data.num_full=0"])
    # A bug is not a user's mistake: its traceback stays.
    def bug(cfg, cfg_yaml):
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        entry.main(bug, "", ["--config", quick, f"storage={tmp_path}/s"])
    # And a good config runs, its result one JSON line.
    assert entry.main(job, "", ["--config", quick, f"storage={tmp_path}/s"]) == 0 and len(ran) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ok": 1}


def test_the_experiment_seed_fills_every_unset_train_seed():
    """Top-level ``seed``: every model's ``train.seed`` left unset (views, full_res, residual,
    distill) takes it at load; one set explicitly is kept; the data split and G's fixed noise do not
    follow it."""
    views = ["views.p.kind=patch", "views.p.patch_size=8", "views.low.kind=downsample", "views.low.factor=2"]
    c = load_config(None, views + ["seed=3", "views.low.train.seed=5"])
    assert (c.full_res.train.seed, c.residual.train.seed, c.distill.train.seed, c.views.p.train.seed) == (3, 3, 3, 3)
    assert c.views.low.train.seed == 5 and c.eval.seed == 0 and c.data.split_seed == 0
    d = load_config(None, views)
    assert {d.full_res.train.seed, d.residual.train.seed, d.distill.train.seed, d.views.p.train.seed} == {0}
    assert from_yaml(to_yaml(c), ExperimentConfig).residual.train.seed == 3  # a run's saved config keeps it
