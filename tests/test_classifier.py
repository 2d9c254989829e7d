"""The evaluation classifier (`bootdiff.evaluation.classifier`) on real MNIST digits from the wheel:
it never reads a test image while training, it recognises held-out digits, its FD and confident
share tell digits from noise, and it is trained once per fingerprint and then read from storage."""

from __future__ import annotations

import pytest
import torch

from bootdiff.config import load_config, to_object
from bootdiff.data.registry import open_source
from bootdiff.evaluation import classifier as clf


class Spy:
    """A source that records every index read."""

    def __init__(self, base):
        self.base, self.read = base, []
        self.labels, self.fixed_test, self.description = base.labels, base.fixed_test, base.description

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.base[i]


@pytest.fixture(scope="module")
def mnist(mnist_wheel):
    cfg = to_object(load_config(None, ["data.source.kind=mnist", f"data.source.path={mnist_wheel}",
                                       "data.resolution=16", "data.channels=1"], check=False))
    return cfg, open_source(cfg.data)


def test_classifier_never_sees_a_test_image_and_scores_digits_above_noise(mnist, tmp_path, monkeypatch):
    cfg, src = mnist
    spy = Spy(src)
    settings = dict(max_train=10000, epochs=3, max_test=1000)
    real_train = clf.train_classifier
    reads = {}

    def spying(source, **kw):
        net, acc = real_train(source, **kw)
        reads["all"] = list(spy.read)
        return net, acc

    monkeypatch.setattr(clf, "train_classifier", spying)
    net, info = clf.cached_classifier(spy, cfg.data, str(tmp_path), **settings)
    train, test, _ = clf.labelled_pool(src, 10000)
    assert not set(train) & set(src.fixed_test) and len(train) == 10000
    test_read = set(test[:1000])
    training_reads = [i for i in reads["all"] if i not in test_read]
    assert set(training_reads) == set(train)  # what it trained on: the training pool only
    assert set(reads["all"]) - set(train) == test_read  # the test split: read once, for the accuracy
    assert info["test_accuracy"] > 0.93  # 0.958 measured (10,000 digits, 3 epochs, 16²)
    x_test, x_ref = clf._batch(src, test[1000:1400]), clf._batch(src, test[1400:1800])
    assert x_test.shape == (400, 1, 16, 16) and info["channels"] == 1
    noise = torch.rand_like(x_test) * 2 - 1
    digits, junk = clf.classifier_scores(net, x_test, x_ref), clf.classifier_scores(net, noise, x_ref)
    assert digits["confident_share"] > 0.75 and junk["confident_share"] < 0.4
    assert digits["classifier_fd"] * 10 < junk["classifier_fd"]

    # cached: the second call reads the weights back, trains nothing, scores the same
    monkeypatch.setattr(clf, "train_classifier", lambda *a, **k: pytest.fail("trained twice"))
    again, info2 = clf.cached_classifier(spy, cfg.data, str(tmp_path), **settings)
    assert info2 == info
    assert clf.classifier_scores(again, x_test, x_ref) == pytest.approx(digits)


def test_unlabelled_source_is_refused_by_name():
    class NoLabels:
        fixed_test = [0]

        def __repr__(self):
            return "ImageFolder(/data/cats)"

    with pytest.raises(ValueError, match=r"ImageFolder\(/data/cats\) has no labels"):
        clf.labelled_pool(NoLabels(), 10)


def test_benchmark_rows_get_the_classifier_scores_of_a_labelled_run(mnist_wheel, tmp_path):
    """`label_quality` on an ingested MNIST run (a limited source keeps its labels and test split):
    the scores and the classifier's test accuracy; nothing for a manifest of other data."""
    from bootdiff import experiment
    from bootdiff.data.ingest import ingest

    cfg = to_object(load_config(None, [f"storage={tmp_path}", "data.source.kind=mnist",
                                       f"data.source.path={mnist_wheel}", "data.source.limit=3000",
                                       "data.resolution=16", "data.num_full=16", "data.num_test=64",
                                       "views.low.kind=downsample", "views.low.factor=2"]))
    manifest = ingest(cfg, progress=False)
    src = open_source(cfg.data)
    assert len(src.labels) == len(src) == 3000 and len(src.fixed_test) > 400
    test_x = experiment.load_all(cfg, manifest, "test", 64)
    full_x = experiment.load_all(cfg, manifest, "full", 16)
    q = clf.label_quality(cfg, manifest, full_x, test_x)
    assert set(q) == {"classifier_fd", "confident_share", "classifier_test_accuracy"}
    assert q["classifier_test_accuracy"] > 0.9 and q["confident_share"] > 0.5  # real digits (0.935: ≈ 2,570 to train on)
    assert clf.label_quality(cfg, {**manifest, "source": {"description": "RandomSource"}}, full_x, test_x) == {}
