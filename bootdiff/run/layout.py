"""Where a run keeps its files: every URL under ``{storage}/{name}/``, in one small object.

    data/                     WebDataset shards per split/view + manifest.json     (ingest)
    data/<split>/             one split's (full, test) or one view's shards
    views/                    Ray Train runs of stage 1 (checkpoints), view-<v>.json (train_views)
    models/<v>/               exported view models, diffusers format              (train_views)
    models/full_res/          exported full-resolution baseline                   (evaluate)
    models/bootstrap/         exported bootstrapped model                         (evaluate)
    sweep/                    stage 2                                             (sweep_residual)
    sweep/tune/               the Ray Tune experiment (restored when interrupted)
    sweep/runs/               each trial's Ray Train run
    sweep/events/             one object per trial start (audit trail)
    sweep/sweep.json          the sweep's outcome: trial rows and the best trial
    sweep/cache/              D_comb's outputs at G's fixed inputs, shared by trials (bootdiff.memo)
    sweep/report/             report.html, report.md, trials.csv, summary.json    (evaluate)
    distill/teacher/          teacher samples: shards + manifest.json (split "teacher") (distill)
    distill/runs/             the student's Ray Train run (``distill/``)
    distill/COMPLETE          written last: the distillation stage is done
    models/student/           exported student (bootdiff format)                  (distill)
    export/diffusers/         the student as a diffusers pipeline folder          (distill)
    tb/<run>/                 TensorBoard event files of each training run: view-<v>, trial-<label>
                              (`tensorboard --logdir {storage}/{name}/tb`; bootdiff.run.tb)
    config.json               the resolved config of a pipeline run
    lease.json                who runs this run now (`bootdiff.run.lease.RunLease`; every entry point)

Later additions belong here too, one more property each.
``storage`` is a local path or any fsspec URL (``s3://``); a local path is made absolute once, here (`absolute_url`), so Ray workers running
in other directories agree on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bootdiff.util import join

TUNE_NAME = "tune"  # the Ray Tune experiment's name: its folder under sweep/


def absolute_url(url: str) -> str:
    """A local path (or ``file://`` URL) as an absolute path; other URLs unchanged."""
    url = str(url)
    if "://" in url and not url.startswith("file://"):
        return url
    return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


@dataclass(frozen=True)
class RunLayout:
    """The URLs of the run ``name`` under ``storage`` (see the module docstring's tree)."""

    storage: str
    name: str

    @classmethod
    def of(cls, cfg) -> "RunLayout":
        """The layout of an experiment config (``cfg.storage``, ``cfg.name``)."""
        return cls(cfg.storage, cfg.name)

    def __post_init__(self):
        object.__setattr__(self, "storage", absolute_url(self.storage))
        object.__setattr__(self, "name", str(self.name))

    @property
    def root(self) -> str:
        return join(self.storage, self.name)

    @property
    def config(self) -> str:
        return join(self.root, "config.json")

    @property
    def lease(self) -> str:
        """The run's lease object (`bootdiff.run.lease.RunLease`): one submission at a time."""
        return join(self.root, "lease.json")

    def url(self, path: str) -> str:
        """A path as Ray reports it (inside its storage filesystem: ``bucket/key`` for s3) as a URL."""
        if self.storage.startswith("s3://") and not str(path).startswith("s3://"):
            return "s3://" + str(path).lstrip("/")
        return str(path)

    # ------------------------------------------------------------------------- data (ingest)

    @property
    def data(self) -> str:
        return join(self.root, "data")

    @property
    def manifest(self) -> str:
        return join(self.data, "manifest.json")

    def split_data(self, split: str) -> str:
        """Folder of a split's (``full``, ``test``) or a view's shards."""
        return join(self.data, split)

    # ------------------------------------------------------------------------- stage 1 and models

    @property
    def view_runs(self) -> str:
        """Ray Train storage of the view runs (``view-<v>/`` each)."""
        return join(self.root, "views")

    def view_run_info(self, view: str) -> str:
        return join(self.view_runs, f"view-{view}.json")

    def failure_marker(self, view: str) -> str:
        """Marker of the one injected failure of a view's run (``ray.inject_failure_step``)."""
        return join(self.view_runs, f"injected-failure-{view}")

    def model(self, name: str) -> str:
        """An exported model: a view name, ``full_res``, ``bootstrap`` or ``student``."""
        return join(self.root, "models", name)

    # ------------------------------------------------------------------------- stage 2 (sweep)

    @property
    def sweep(self) -> str:
        return join(self.root, "sweep")

    @property
    def tune(self) -> str:
        """The Ray Tune experiment folder (``sweep/tune``)."""
        return join(self.sweep, TUNE_NAME)

    @property
    def sweep_json(self) -> str:
        return join(self.sweep, "sweep.json")

    @property
    def trial_runs(self) -> str:
        """Ray Train storage of the trials' runs (``trial-<label>/`` each)."""
        return join(self.sweep, "runs")

    @property
    def events(self) -> str:
        return join(self.sweep, "events")

    def trial_start_event(self, label: str, stamp_ns: int) -> str:
        return join(self.events, f"{label}.{stamp_ns}.start")

    def trial_final_error(self, label: str, session: str) -> str:
        """A trial's deterministic failure in one run of the sweep (Tune's retries read it)."""
        return join(self.events, f"{label}.{session}.error")

    @property
    def eval_cache(self) -> str:
        """The frozen combined denoiser's outputs on G's fixed noisy inputs, one file per
        fingerprint of its weights (`bootdiff.memo`): derived data, safe to delete."""
        return join(self.sweep, "cache")

    # ------------------------------------------------------------------------- distillation

    @property
    def distill(self) -> str:
        return join(self.root, "distill")

    @property
    def teacher_samples(self) -> str:
        """Root of the teacher-sample shards (``teacher/…tar``) and their ``manifest.json``."""
        return join(self.distill, "teacher")

    @property
    def distill_runs(self) -> str:
        """Ray Train storage of the student's run (``distill/``)."""
        return join(self.distill, "runs")

    @property
    def distill_done(self) -> str:
        """The stage's done-marker, written after both exports (`bootdiff.distill.student.mark_done`)."""
        return join(self.distill, "COMPLETE")

    @property
    def diffusers_export(self) -> str:
        """The student as a diffusers pipeline folder (`bootdiff.distill.export`)."""
        return join(self.root, "export", "diffusers")

    # ------------------------------------------------------------------------- TensorBoard

    @property
    def tb(self) -> str:
        """TensorBoard's ``--logdir``: one folder per training run (`bootdiff.run.tb`)."""
        return join(self.root, "tb")

    def tb_run(self, run: str) -> str:
        """A training run's event files: ``view-<v>``, ``trial-<label>`` or a benchmark's name."""
        run = str(run).strip("/")
        if not run or ".." in run.split("/"):
            raise ValueError(f"RunLayout.tb_run: bad run name {run!r}")
        return join(self.tb, run)

    # ------------------------------------------------------------------------- stage 3 (report)

    @property
    def report(self) -> str:
        return join(self.sweep, "report")

    @property
    def summary(self) -> str:
        """``summary.json``: written last by the evaluation, so it marks the stage done."""
        return join(self.report, "summary.json")
