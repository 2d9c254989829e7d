"""bootdiff: bootstrapping diffusion — full-resolution diffusion models from scarce full data plus
plentiful partial views (patches, low-res copies, clips, clean regions of corrupted images).

The library is pure PyTorch + diffusers + webdataset + fsspec and never imports Ray; the Ray
entry points live in ``ray_jobs/``.
"""

__version__ = "0.1.0"
