"""The data-efficiency benchmark: test G and SWD against the number N of full-resolution samples.

For one config and a list of N (``benchmarks/data_efficiency.py``), under ``{out}/``:

    base/data        one ingest with ``data.num_full = max N``: the views (cut from the partial
                     pool, fixed for every N), the test split, and the full pool
    base/models/<v>  the view models, trained once; copied to every dataset below
    N<n>/data        full = the first N of the full pool (nested: N16 ⊂ N64 ⊂ ...); test, views shared
    N<n>-select/data full = the first N − v of them, test = the last v (validation carve-out: μ
                     selection never sees the test split)
    oracle/data      full = the whole pool (partial pool + full pool) at full resolution
    oracle-select/data  the same less a carve-out from the partial pool's end (test = it): where
                     the oracle stops
    runs/<model>/    local training runs; results/<model>.json one file per finished model

Shared splits are the base ingest's shard files (hard-linked, or copied on object stores) with
their sha256, so "same views, same test" is checkable bit for bit. Every manifest states one
``g_sigma_data``, the test split's σ_data, so G (docs/METHOD.md §6) weighs every model alike
(`bootdiff.experiment.g_sigma_data`).

Models: per N a ``baseline`` (full-res model on the N images), ``combined`` (fusion of the view
models, no training, docs/METHOD.md §3), ``select-*`` residuals on N − v images scored on the v
held back, ``select-baseline`` (the baseline on the same N − v, whose validation curve says where
to stop the baseline, as the selected residual's says for the bootstrap), and ``bootstrap`` (the
residual with the selected μ_var / μ_L1 on all N, §4); once an ``oracle`` (full-res model on the
whole pool, with its own ``select-oracle``); and per peer method the config's views allow
(`bootdiff.efficiency.models.peers`: ``ambient``, ``finetune``, ``patchdiff``, `bootdiff.peers`) one network on the
N images and the same partial pool, with its own ``select-<peer>`` run on N − v that says where
to stop it (one per ``peers.<peer>.grid`` value of its tuned hyperparameter, `bootdiff.peers.TUNED`,
the best on validation taken), given the bootstrap's training compute in FLOPs (view models + residual,
`bootdiff.efficiency.compute`), not its kimg. Baselines and residuals share one budget (kimg).
With ``patience`` (``--patience``) every selection run stops when its carve-out's G has not
improved for that many checkpoints (`bootdiff.stopping`), the model it selects for trains as
long as it ran, and the baselines and the oracle may train up to the bootstrap's whole compute
(`bootdiff.efficiency.models.raise_caps`): every row at its validation minimum, none cut short. Training is a runner's job: `bootdiff.efficiency.train.train_local`
in this process, Ray Train in
``ray_jobs/efficiency.py``; `evaluate_job` scores a finished model (G on test and train, SWD per
pyramid level, memorisation, nearest-neighbour distance, FD when ``eval.features`` is set, §8).
"""
