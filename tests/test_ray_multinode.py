"""Past one machine, and the whole pipeline as users run it: `ray job submit` on the three-node Ray
cluster the Ray tests share (tests/raycluster.py: a head that takes no work and worker nodes ``a``
and ``b``, each its own ``ray start`` with its own temp dir and working directory), with moto's S3
server as the only storage. The job-submitted pipeline runs end to end with every stage on (the
Ambient peer, the early-stopped baseline, distillation) and the data-parallel view's Train workers
failing once (the run resumes from its checkpoint; the other view, the baseline, peer and student
run the same worker, so their resume is the same code); each view lands on the node its label selector
names and the sweep's trials use both nodes (Ray Train's state API); the report, TensorBoard runs
and exported models are checked, the cloud keys only the nodes hold are nowhere else, and a
re-submission skips every finished stage. A local storage path and a placement no node can take
fail at load, naming the key, before anything is written. The faults on the same cluster are
tests/test_ray_multinode_faults.py's."""

import json
import os
import re
import time

import pytest

from raycluster import KEY_ID, PIPELINE, SECRET, files_containing, s3fs, submit
from rayhead import tb_raw_steps

pytestmark = pytest.mark.ray


def test_job_submitted_pipeline_on_three_nodes_end_to_end(cluster, submitted):
    proc, root, fs, key = submitted["proc"], submitted["root"], s3fs(), submitted["key"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-6000:]

    # Progress in the job's logs; the dashboard's job API lists the job as SUCCEEDED.
    for line in ("=== stage ingest", "=== stage train_views", "=== stage sweep_residual", "=== stage distill",
                 "=== stage evaluate", "kimg", "sweep report:"):
        assert line in out, f"job log lacks {line!r}"
    # Train's per-report / per-checkpoint INFO lines stay off the console (ray.train_log_level)
    assert "Reporting training result" not in out and "Checkpoint successfully created" not in out
    assert "RayDeprecationWarning" not in out  # Ray's own deprecation noise (entry.quiet_ray)
    # the preemption watcher stays on on a cluster the driver joins; its actor's C++ error line does not reach the job's log
    assert "PreemptionWatcher" not in out and "core_worker.cc" not in out, out[-6000:]
    # the raylet's worker-pool warning and each Train run's placement-group cleaner line: dropped by the driver
    assert "worker processes have been started" not in out and "Cleaning up placement group" not in out, out[-6000:]
    assert "tensorboard --logdir" not in out  # Tune's own TensorBoard logger is off: the runs' curves are tb/'s
    assert "chosen on validation G" in out  # the sweep says what it chose on
    sub_id = out.split("Job '")[1].split("'")[0]
    job = next(j for j in cluster.api("/api/jobs/") if j["submission_id"] == sub_id)
    assert job["status"] == "SUCCEEDED"

    # Placement, from Ray Train's state API: each view's workers on the node its label selector
    # names, the low-res view data-parallel over node b, the sweep's Train trials on both nodes.
    runs = cluster.train_runs()
    assert cluster.nodes_of(runs, "view-patch", submitted["since"]) == {"a"}, runs
    assert cluster.nodes_of(runs, "view-low", submitted["since"]) == {"b"}, runs
    low = [r for r in runs if r["name"] == "view-low"][-1]
    assert len(low["attempts"][-1]["workers"]) == 2
    trial_nodes = set().union(*[cluster.nodes_of(runs, r["name"]) for r in runs if r["name"].startswith("trial-")])
    assert trial_nodes == {"a", "b"}, [(r["name"], cluster.nodes_of(runs, r["name"])) for r in runs]

    # Everything on S3: data, Train's and Tune's checkpoints, the report; the nodes' own working
    # directories hold nothing of the run.
    files = fs.find(key)
    assert f"{key}/data/manifest.json" in files and any(f.startswith(f"{key}/data/low/") for f in files)
    assert any("/views/view-low/" in f and f.endswith("state.pt") for f in files)
    assert any("/sweep/runs/" in f and f.endswith("state.pt") for f in files)
    for name in ("head", "a", "b"):
        assert not os.listdir(os.path.join(cluster.root, name, "work")), name

    # Two views trained concurrently: their run intervals overlap.
    views = {v: json.load(open(os.path.join(root, "views", f"view-{v}.json"))) for v in ("patch", "low")}
    assert max(r["start"] for r in views.values()) < min(r["end"] for r in views.values())

    # Fault injection: the low-res view's workers (2 ranks x 64 per step, 3 steps = 0.384 kimg, a
    # checkpoint every step) raised at step 3, its last; `fit_retrying` started the run again from
    # its checkpoint and the step count carried on to the end. The patch view (0.32 kimg / 64 per
    # step = 5 steps) ran through.
    assert os.path.exists(os.path.join(root, "views", "injected-failure-low"))
    assert not os.path.exists(os.path.join(root, "views", "injected-failure-patch"))
    assert views["patch"]["metrics"]["step"] == 5
    assert views["low"]["metrics"]["step"] == 3 and abs(views["low"]["metrics"]["kimg"] - 0.384) < 1e-6
    assert "injected failure at step 3" in out and "injected failure at step 4" not in out
    resumed = {}  # run -> steps it resumed from ("[bootdiff] resuming from step N (<checkpoint URL>)")
    for line in out.splitlines():
        if "resuming from step" in line:
            step, path = line.split("resuming from step ")[1].split(" ", 1)
            run = next(r for r in ("view-patch", "view-low", "trial-full_res", "trial-ambient", "trial-residual",
                                   "distill") if r in path)
            resumed.setdefault(run, set()).add(int(step))
    # Only the run ray.inject_failure_runs names failed: the other view, the baseline, the peer,
    # the student and the residual trials ran through.
    assert resumed == {"view-low": {3}}, resumed

    # The residual trial, both baselines and the peer finished; the best residual is a real trial.
    sweep = json.load(open(os.path.join(root, "sweep", "sweep.json")))
    kinds = [t["kind"] for t in sweep["trials"]]
    assert kinds.count("residual") == 1 and "combined" in kinds and "full_res" in kinds and "ambient" in kinds
    # the best bootstrapped trial averaged with the peer, its weight the lowest validation G of sweep.ensemble's
    ens = next(t for t in sweep["trials"] if t["kind"] == "ensemble")
    assert ens["members"] == [sweep["best"], "ambient"] and ens["checkpoint"] is None
    assert ens["val_G"] == min(ens["val_G_by_weight"].values()) and len(ens["val_G_by_weight"]) == 3
    assert f"[bootdiff] ensemble: {ens['weights'][0]:g} × {sweep['best']} + {ens['weights'][1]:g} × ambient" in out
    assert [(t["mu_var"], t["mu_l1"]) for t in sweep["trials"] if t["kind"] == "residual"] == [(1.0, 0.0)]
    best = next(t for t in sweep["trials"] if t["trial_id"] == sweep["best"])
    assert best["kind"] == "residual" and best["test_G"] > 0 and best["checkpoint"]
    assert all(t["test_G"] > 0 and t["val_G"] > 0 for t in sweep["trials"])
    # the recommended model: the lowest validation G of every model, the peer and the baselines included
    rec = next(t for t in sweep["trials"] if t["trial_id"] == sweep["recommended"])
    assert rec["val_G"] == min(t["val_G"] for t in sweep["trials"] if t["checkpoint"] or t["kind"] in ("combined", "ensemble"))

    # The report: HTML with embedded plots, Markdown twin, CSV of all trials.
    rep = os.path.join(root, "sweep", "report")
    html = open(os.path.join(rep, "report.html")).read()
    assert html.count("data:image/png;base64,") >= 6 and sweep["best"] in html
    assert sweep["best"] in open(os.path.join(rep, "report.md")).read()
    assert len(open(os.path.join(rep, "trials.csv")).read().strip().splitlines()) == 1 + len(sweep["trials"])
    summary = json.load(open(os.path.join(rep, "summary.json")))
    assert {"bootstrapped", "combined", "full_res", "ambient", "ensemble", "patch only", "low only"} <= set(summary["quality"])
    assert summary["recommended"]["trial_id"] == rec["trial_id"] and "Recommended model: " + rec["trial_id"] in html
    assert "Ambient Omni" in html  # the peer's row in Figure 1's table

    # TensorBoard (uploaded to S3 with each checkpoint): one run per view model and trained trial,
    # with its curves, G at checkpoints, and each step once although the views were resumed.
    from bootdiff.run.tb import read_runs

    tb = read_runs(os.path.join(root, "tb"))
    assert set(tb) == {"view-patch", "view-low", "distill"} | {f"trial-{t['trial_id']}" for t in sweep["trials"]
                                                    if t["kind"] not in ("combined", "ensemble")}, sorted(tb)
    for name, tags in tb.items():
        assert {"loss", "lr", "grad_norm_max", "img_per_s", "kimg"} <= set(tags), (name, sorted(tags))
        # held-out curves on the validation split: the test split is met once, at the checkpoint chosen
        assert name.startswith("view-") or ({"val_G", "train_G"} <= set(tags) and "test_G" not in tags), \
            (name, sorted(tags))
        raw = tb_raw_steps(os.path.join(root, "tb", name), "loss")
        assert raw == sorted(set(raw)) and raw == list(tags["loss"]["step"]), (name, raw)
    for v in ("patch", "low"):
        assert tb[f"view-{v}"]["loss"]["step"][-1] == round(views[v]["metrics"]["kimg"] * 1000)
    # Early stopping on validation: each trained trial (the baseline too) is taken at the checkpoint
    # with its lowest val G over the whole run (its curve), and that checkpoint was kept. A trial
    # ASHA stops may log a checkpoint or two more to TensorBoard while the stop reaches its worker
    # (seen on a loaded machine); Tune never receives them, so the curve counts to its last result.
    for t in sweep["trials"]:
        if t["kind"] in ("combined", "ensemble"):  # trained nothing of their own
            continue
        curve = tb[f"trial-{t['trial_id']}"]["val_G"]
        seen = [i for i, k in enumerate(curve["kimg"]) if k <= t["kimg"] + 1e-6]
        assert seen and (t["status"] == "stopped_early" or len(seen) == len(curve["kimg"])), (t, curve)
        k = min(seen, key=lambda i: curve["value"][i])
        assert t["val_G"] == pytest.approx(curve["value"][k], rel=1e-5), t
        assert t["chosen_kimg"] == pytest.approx(curve["kimg"][k], abs=1e-3) and t["chosen_kimg"] <= t["kimg"]
        assert fs.exists(t["checkpoint"]), t  # on S3 (Ray names it without the s3:// scheme)
    assert "<h2>Training curves</h2>" in html and "report_files/training_G.png" in open(
        os.path.join(rep, "report.md")).read()
    # The report's answer comes first and stands on the early-stopped baseline: stopped by patience 1
    # (its last checkpoint no better than its best before it), or at its cap, "still improving" when
    # the cap was its best.
    from bootdiff.evaluation.plots import _fmt

    fr = next(t for t in sweep["trials"] if t["kind"] == "full_res")
    vals = tb["trial-full_res"]["val_G"]["value"]
    said = [line for line in open(os.path.join(rep, "report.md")).read().splitlines() if line.startswith("- ")][1]
    assert said.startswith("- At N = 16 full-res samples the partial data "), said
    assert "[bootdiff] " + said[2:] in out  # the answer on the console too, before the report's path
    assert summary["verdict"][0] == said[2:]
    if fr["status"] == "stopped_early":
        assert len(vals) >= 3 and vals[-1] >= min(vals[:-1]) and fr["kimg"] < 0.32, (fr, vals)
        assert f"had not improved for 1 checkpoint, at {_fmt(fr['kimg'])} of its 0.32-kimg cap" in said, said
    else:
        assert fr["status"] == "complete" and fr["kimg"] >= 0.32, fr
        capped = fr["chosen_kimg"] >= fr["kimg"] - 1e-6
        assert ("reached its 0.32-kimg cap still improving" in said) == capped, (fr, said)

    # Exported models load with plain diffusers, and the bootstrapped model with bootdiff.
    import torch
    from diffusers import DiffusionPipeline, UNet2DModel

    from bootdiff.export import load_bootstrap_model

    for v in ("patch", "low", "full_res", "ambient"):
        assert isinstance(UNet2DModel.from_pretrained(os.path.join(root, "models", v, "net")), UNet2DModel)
    model = load_bootstrap_model(os.path.join(root, "models", "bootstrap"))
    x = torch.randn(2, 1, 32, 32)
    assert model(x, torch.tensor([0.5, 2.0])).shape == x.shape

    # Distillation: teacher samples written by Ray tasks as shards, the student trained as a Ray
    # Train run, scored in the report, exported as a diffusers pipeline.
    for done in ("distill/COMPLETE", "models/student/COMPLETE", "export/diffusers/COMPLETE"):
        assert os.path.exists(os.path.join(root, done)), done
    teacher = json.load(open(os.path.join(root, "distill", "teacher", "manifest.json")))
    assert teacher["splits"]["teacher"]["count"] == 8
    assert not os.path.exists(os.path.join(root, "views", "injected-failure-distill"))
    assert "student" in summary["quality"] and "student" in summary["total_G"]
    assert summary["distill_step_time"]["ratio"] > 0 and "student" in open(os.path.join(rep, "report.md")).read()
    assert "distill" in json.load(open(os.path.join(root, "timings.json")))["stages"]
    assert "distill" in tb and {"val_G", "train_G"} <= set(tb["distill"])
    folder = os.path.join(root, "export", "diffusers")
    assert json.load(open(os.path.join(folder, "model_index.json")))["_class_name"] == \
        ["bootdiff_pipeline", "BootdiffEDMPipeline"]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert pipe(batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 32, 32, 1)


def test_credentials_stay_out_of_job_records_and_logs(cluster, submitted):
    """The pipeline's workers reached S3 with the keys only the nodes hold (it wrote its whole run
    there), and the keys are nowhere else: not in the dashboard's job records, the job's log,
    any file of Ray's session dirs on the three nodes, or anything the run stored."""
    assert submitted["proc"].returncode == 0
    needles = (SECRET, KEY_ID)
    assert not [n for n in needles if n in submitted["proc"].stdout + submitted["proc"].stderr]
    records = json.dumps(cluster.api("/api/jobs/"))
    assert "raysubmit_" in records and not [n for n in needles if n in records]
    assert not files_containing(cluster.root, needles)  # every node's temp dir (Ray's session) and work dir
    fs = s3fs()
    stored = [f for f in fs.find(submitted["key"]) if any(n.encode() in fs.cat(f) for n in needles)]
    assert not stored


def test_resubmit_skips_finished_stages(cluster, submitted):
    """Re-submitting the same run finds every stage complete and carries on in seconds."""
    assert submitted["proc"].returncode == 0
    fs, marker = s3fs(), f"{submitted['key']}/distill/COMPLETE"
    before = fs.info(marker)["LastModified"]
    t0 = time.time()
    proc = submit(cluster, f"storage={submitted['storage']}", *PIPELINE)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for msg in ("data already ingested", "already exported", "sweep already complete", "distill: already done",
                "report already written"):
        assert msg in out
    assert s3fs().info(marker)["LastModified"] == before
    assert time.time() - t0 < submitted["seconds"] / 2


def test_local_storage_and_unplaceable_runs_fail_at_load_naming_the_key(cluster, tmp_path):
    """Both mistakes of one submission, a line each, before anything is written."""
    local = tmp_path / "runs"
    proc = submit(cluster, f"storage={local}", "views.patch.scaling.label_selector={node: c}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ERROR: storage=" in out, out[-4000:]
    assert f"storage='{local}' is a local path, but the Ray cluster has 3 nodes" in out and "s3://" in out
    assert "ray.shared_storage=true" in out and "Traceback" not in out
    assert "\nviews.patch.scaling.label_selector={'node': 'c'} selects no node of the Ray cluster" in out, out[-4000:]
    assert re.search(r"labels node=a\b", out) and re.search(r"labels node=b\b", out)  # what there is instead
    assert not local.exists()  # nothing written: not even the run's lease
