"""A run's place in storage, shared by every stage.

- `bootdiff.run.layout`: `RunLayout`, every URL of a run under ``{storage}/{name}/``;
- `bootdiff.run.lease`: one submission of a run at a time (``lease.json``);
- `bootdiff.run.tb`: TensorBoard event files of every training run, and reading them back;
- `bootdiff.run.scratch`: local temp folders a killed worker does not leave behind.
"""
