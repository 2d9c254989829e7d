"""Which failures a retry cannot fix.

A run that fails because of its own config, its data or its numbers fails the same way every time:
retrying it only repeats the failure (and, on Ray, spends ``ray.max_failures`` restarts and their
start-up time before the message reaches the user). A lost worker, node or connection is
different: a retry from the latest checkpoint finishes the run. `deterministic` draws that line
for an exception raised by bootdiff code; ``ray_jobs/train_views.py`` (`fit_retrying`) retries a
Train run only when no worker failed deterministically (docs/RAY.md §1).

Deterministic (never retried):

* ``FloatingPointError`` — a non-finite loss, gradient or weight (`bootdiff.train`);
* ``ValueError`` — config errors (`bootdiff.config.check`) and data errors: a bad or missing
  manifest, a shard whose sha256 changed (`bootdiff.data.shards.ManifestError`,
  ``ChecksumError``), bad array bytes;
* ``LookupError`` (``KeyError``, ``IndexError``), ``TypeError``, ``AttributeError``,
  ``NotImplementedError``, ``AssertionError`` — a config key or view that does not exist, code
  that does not fit the data;
* `bootdiff.data.loader.ShardError` — a shard that cannot be read (truncated tar, bad sample).
  s3fs already retries transient S3 errors itself; what survives them is the shard's bytes.

Everything else (``RuntimeError``, ``OSError``, a worker killed by a signal, Ray's system errors)
is retried.
"""

from __future__ import annotations

DETERMINISTIC = (FloatingPointError, ValueError, LookupError, TypeError, AttributeError,
                 NotImplementedError, AssertionError)


def deterministic(exc: BaseException) -> bool:
    """True when ``exc`` would recur on a retry of the same run (see module docstring)."""
    from bootdiff.data.loader import ShardError

    return isinstance(exc, DETERMINISTIC + (ShardError,))
