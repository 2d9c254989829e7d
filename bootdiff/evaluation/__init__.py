"""Evaluation and the sweep report: what a trained denoiser is worth and how a person sees it.

- `bootdiff.evaluation.metrics`: G per σ and its quantile, sliced Wasserstein, memorisation,
  nearest neighbours (docs/METHOD.md §6, §8);
- `bootdiff.evaluation.fd`, `bootdiff.evaluation.inception`: Fréchet distance in a local feature
  network (FID Inception-v3 or DINOv2), never downloaded;
- `bootdiff.evaluation.classifier`: for labelled sources, a small classifier trained on the
  training pool (never the test split): FD in its features and the share of confident samples;
- `bootdiff.evaluation.scores`: G of a model on a split, and of a checkpoint (what every training
  run reports);
- `bootdiff.evaluation.evaluate`: stage 3, every model scored and sampled, the report written;
- `bootdiff.evaluation.report`, `bootdiff.evaluation.plots`, `bootdiff.evaluation.quality`,
  `bootdiff.evaluation.summary`: the report (HTML, Markdown, CSV), its figures, its Figure-1 table
  and budget sentences, its summary (the recommendation first, then every model against it);
- `bootdiff.evaluation.worth`: what a data-efficiency benchmark of the same data measured each
  model worth in full-res images at the run's N (``eval.benchmark``), quoted in the report.
"""
