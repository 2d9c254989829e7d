"""After the sweep: one network distilled from the bootstrapped model, and its export.

- `bootdiff.distill.student`: teacher samples as shards, the student's loss and training data,
  its export and its sampling-step cost (docs/METHOD.md §9);
- `bootdiff.distill.export`: the student saved as a diffusers pipeline folder;
- `bootdiff.distill.pipeline`: that pipeline's class (`BootdiffEDMPipeline`), copied into the
  folder so diffusers runs it with ``trust_remote_code=True``.
"""
