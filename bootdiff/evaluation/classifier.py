"""Sample quality a person reads, with a network that exists here: a small classifier trained on a
labelled source's training pool, its feature space for a Fréchet distance, and its confidence.

No Inception or DINOv2 weights can be fetched on an offline machine, so for a labelled source
(MNIST, IDX files with labels) the project trains its own: a 3-layer CNN on the source's labelled
samples that are not in its natural test split (``fixed_test``) — the test split is never seen —
resized to the experiment's resolution and channels exactly as ingest conforms them. Its test
accuracy on ``fixed_test`` is recorded beside the weights. Two numbers per set of samples:

* ``classifier_fd``: the Fréchet distance (`bootdiff.evaluation.fd.fd_features`) between the
  samples' and the reference images' penultimate features (128-d), as FID does with Inception;
* ``confident_share``: the share of samples the classifier assigns a class with probability ≥ 0.9
  — "looks like a digit" as a number.

The classifier is cached under ``{storage}/classifiers/<fingerprint>.pt`` (the fingerprint names
the source, resolution, channels and training settings), so every run and benchmark on the same
data shares one.
"""

from __future__ import annotations

import hashlib
import io
import json
import numpy as np
import torch
from torch import nn

from bootdiff import util

CONFIDENCE = 0.9


class DigitClassifier(nn.Module):
    """conv(32) → conv(64) → conv(128), each 3×3 + GroupNorm + SiLU with stride 2 after the
    first, pooled to 4×4 → linear → 128-d features (SiLU) → linear to the classes."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        layers, cin = [], channels
        for i, cout in enumerate((32, 64, 128)):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
            cin = cout
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128 * 16, 128), nn.SiLU())
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def labelled_pool(source, max_train: int, seed: int = 0):
    """(train indices, test indices, labels) of a labelled source: training samples drawn from
    everything outside ``fixed_test`` (at most ``max_train``, seeded), the test split =
    ``fixed_test``. A source without labels or without a natural test split is an error."""
    labels = getattr(source, "labels", None)
    if labels is None:
        raise ValueError(f"{source!r} has no labels: the classifier metrics need a labelled source")
    if not source.fixed_test:
        raise ValueError(f"{source!r} has no natural test split (fixed_test): the classifier would need "
                         "one to be scored without touching the training images")
    test = sorted(set(source.fixed_test))
    held = set(test)
    rest = np.array([i for i in range(len(source)) if i not in held])
    rng = np.random.default_rng(seed)
    train = sorted(rng.permutation(rest)[:max_train].tolist())
    return train, test, np.asarray(labels)


def _batch(source, idx) -> torch.Tensor:
    """Source samples (uint8 ``[H, W, C]``) as [-1, 1] float ``[N, C, H, W]``, as the shards hold them."""
    return torch.from_numpy(np.stack([source[i] for i in idx])).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_classifier(source, max_train: int = 10000, epochs: int = 3, batch_size: int = 32,
                     seed: int = 0, max_test: int = 2000):
    """(classifier in eval mode, its accuracy on ``fixed_test``): Adam, lr 2e-3, on
    `labelled_pool`'s training samples only, with ±2-pixel random shifts."""
    train, test, labels = labelled_pool(source, max_train, seed)
    x = _batch(source, train)
    y = torch.as_tensor(labels[train], dtype=torch.long)
    num_classes = int(labels.max()) + 1
    torch.manual_seed(seed)
    net = DigitClassifier(x.shape[1], num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            b = order[s:s + batch_size]
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(x[b], shifts=(dx, dy), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    test = test[:max_test]
    with torch.no_grad():
        pred = torch.cat([net(_batch(source, test[s:s + 512])).argmax(1) for s in range(0, len(test), 512)])
    acc = float((pred == torch.as_tensor(labels[test])).float().mean())
    return net, acc


def fingerprint(source, data_cfg, settings: dict) -> str:
    key = json.dumps({"source": getattr(source, "description", repr(source)), "n": len(source),
                      "resolution": int(data_cfg.resolution), "channels": int(data_cfg.channels), **settings},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cached_classifier(source, data_cfg, storage: str, **settings):
    """(classifier, info) — trained once per fingerprint and cached under
    ``{storage}/classifiers/<fp>.pt`` with ``info`` (test accuracy, sizes) beside it in ``.json``."""
    fp = fingerprint(source, data_cfg, settings)
    url = util.join(storage, "classifiers", f"{fp}.pt")
    info_url = util.join(storage, "classifiers", f"{fp}.json")
    if util.exists(url) and util.exists(info_url):
        info = json.loads(util.read_bytes(info_url))
        net = DigitClassifier(info["channels"], info["num_classes"])
        net.load_state_dict(torch.load(io.BytesIO(util.read_bytes(url)), map_location="cpu"))
        return net.eval(), info
    print(f"[bootdiff] training the evaluation classifier on {source!r} (cached at {url})", flush=True)
    net, acc = train_classifier(source, **settings)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    info = {"test_accuracy": acc, "channels": net.body[0].in_channels, "num_classes": net.head.out_features,
            "settings": settings, "fingerprint": fp, "test_split": "the source's fixed_test (never trained on)"}
    util.atomic_write_bytes(url, buf.getvalue())
    util.atomic_write_bytes(info_url, json.dumps(info, indent=1).encode())
    return net, info


LABELLED_KINDS = ("mnist", "idx")  # source kinds that can carry labels


def label_quality(cfg, manifest: dict, samples: torch.Tensor, reference: torch.Tensor) -> dict:
    """``{"classifier_fd", "confident_share", "classifier_test_accuracy"}`` of ``samples``
    against ``reference`` when the run's data came from a labelled source with a natural test
    split — the config's source, and the one the manifest says was ingested — (the cached
    classifier of `cached_classifier`, under ``cfg.storage``); ``{}`` otherwise (e.g. cats64)."""
    from bootdiff.data.registry import open_source

    if str(cfg.data.source.kind) not in LABELLED_KINDS or samples.ndim != 4:
        return {}
    source = open_source(cfg.data)
    if (getattr(source, "labels", None) is None or not source.fixed_test
            or (manifest.get("source") or {}).get("description") != source.description):
        return {}
    net, info = cached_classifier(source, cfg.data, str(cfg.storage))
    return {**classifier_scores(net, samples, reference), "classifier_test_accuracy": info["test_accuracy"]}


@torch.no_grad()
def classifier_scores(net: DigitClassifier, samples: torch.Tensor, reference: torch.Tensor,
                      batch_size: int = 256) -> dict:
    """``{"classifier_fd", "confident_share"}`` of [-1, 1] ``samples`` against ``reference``
    images (the test split), both [N, C, H, W] at the classifier's resolution."""
    from bootdiff.evaluation.fd import fd_features

    def feats_and_conf(x):
        f, c = [], []
        for s in range(0, len(x), batch_size):
            h = net.features(x[s:s + batch_size].float())
            f.append(h.double())
            c.append(net.head(h).softmax(1).max(1).values)
        return torch.cat(f).numpy(), torch.cat(c)

    fs, conf = feats_and_conf(samples)
    fr, _ = feats_and_conf(reference)
    return {"classifier_fd": float(fd_features(fs, fr)), "confident_share": float((conf >= CONFIDENCE).float().mean())}
