"""Export / import of trained models as folders: diffusers nets + a ``bootdiff.json`` manifest.

View model (``kind: "view"``)::

    {url}/bootdiff.json    format, format_version, kind, precond "edm" (or "edm-coords" with
                           image_size: a position-aware patch model), sigma_data, net_class,
                           time_scale, view (the ViewConfig), extra (caller's JSON dict)
    {url}/net/             diffusers ``save_pretrained`` folder of the backbone
                           (``UNet2DModel`` for images — loadable with plain diffusers —,
                           `bootdiff.nets.VideoUNet` for clips)
    {url}/COMPLETE         written last (`bootdiff.util.atomic_dir` convention)

Bootstrapped model (``kind: "bootstrap"``)::

    {url}/bootdiff.json    fusion, fusion_weights, range_adapter (exact tensor values),
                           residual (sigma_data, net_class, time_scale), views: one entry per
                           view model: name, folder, and the view operator's parameters
                           (the view class's ``to_json``: patch grid / factor / clip windows)
                           so the view is rebuilt exactly (`bootdiff.views.view_from_json`)
    {url}/views/NN/        a complete view-model folder (above) per view
    {url}/residual/net/    diffusers folder of the residual net (in_channels = 2·C)

Any fsspec URL works: the folder is written to a local staging directory and committed
(renamed locally, uploaded file by file to object stores, the ``COMPLETE`` marker last);
loading from an object store downloads to a temporary directory first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from bootdiff.config import ConfigError, ViewConfig, to_object
from bootdiff.nets import ImageUNet, VideoUNet
from bootdiff.precond import CoordPrecond, EDMPrecond
from bootdiff.residual import BootstrapDenoiser, RangeAdapter, ResidualPrecond
from bootdiff.util import _is_local, atomic_dir, url_fs
from bootdiff.views import View, view_from_json

FORMAT = "bootdiff"
FORMAT_VERSION = 1
MANIFEST = "bootdiff.json"
NET_CLASSES = {"ImageUNet": ImageUNet, "VideoUNet": VideoUNet}


# ----------------------------------------------------------------------------- folders & URLs


@contextlib.contextmanager
def _read_folder(url: str) -> Iterator[str]:
    """A local directory holding the complete folder at ``url`` (downloaded if remote)."""
    fs, path = url_fs(url)
    path = path.rstrip("/")
    if not fs.exists(f"{path}/{MANIFEST}"):
        raise FileNotFoundError(f"{url}: not a bootdiff model folder (no {MANIFEST})")
    if not fs.exists(f"{path}/COMPLETE"):
        raise FileNotFoundError(f"{url}: incomplete model folder (no COMPLETE marker; the export "
                                f"was interrupted or is still being written)")
    if _is_local(fs):
        yield path
        return
    local = tempfile.mkdtemp(prefix="bootdiff-import-")
    try:
        for remote in fs.find(path):
            rel = remote[len(path):].lstrip("/")
            os.makedirs(os.path.dirname(os.path.join(local, rel)), exist_ok=True)
            fs.get_file(remote, os.path.join(local, rel))
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _read_manifest(folder: str, kind: str, url: str) -> Dict[str, Any]:
    file = os.path.join(folder, MANIFEST)
    try:
        with open(file) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url}/{MANIFEST}: not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{url}/{MANIFEST}: key 'format' is {manifest.get('format')!r}, expected '{FORMAT}'")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{url}/{MANIFEST}: key 'format_version' is {version!r}; this bootdiff "
                         f"reads versions up to {FORMAT_VERSION}")
    if manifest.get("kind") != kind:
        raise ValueError(f"{url}/{MANIFEST}: key 'kind' is {manifest.get('kind')!r}, expected '{kind}'")
    return manifest


def _write_manifest(folder: str, manifest: Dict[str, Any]) -> None:
    try:
        text = json.dumps(manifest, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{MANIFEST}: cannot serialise the manifest (check 'extra'): {exc}") from None
    with open(os.path.join(folder, MANIFEST), "w") as f:
        f.write(text + "\n")


def read_manifest(url: str) -> Dict[str, Any]:
    """The ``bootdiff.json`` manifest of an exported folder (view or bootstrap)."""
    fs, path = url_fs(url)
    with fs.open(f"{path.rstrip('/')}/{MANIFEST}", "r") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- nets & tensors


def _save_net(net, folder: str, owner: str) -> Dict[str, Any]:
    for name, cls in NET_CLASSES.items():
        if type(net) is cls:
            net.save_pretrained(folder, safe_serialization=True)
            time_scale = net.time_scale if cls is ImageUNet else net.config.time_scale
            return {"net_class": name, "time_scale": float(time_scale)}
    raise TypeError(f"{owner}: cannot export a backbone of type {type(net).__name__}; expected one "
                    f"of {sorted(NET_CLASSES)} (bootdiff.nets.make_net)")


def _load_net(folder: str, info: Dict[str, Any], url: str):
    name = info.get("net_class")
    if name not in NET_CLASSES:
        raise ValueError(f"{url}/{MANIFEST}: key 'net_class' is {name!r}, expected one of {sorted(NET_CLASSES)}")
    if name == "ImageUNet":
        return ImageUNet.from_pretrained(folder, time_scale=float(info["time_scale"]))
    return VideoUNet.from_pretrained(folder, low_cpu_mem_usage=False)


def _tensors_to_json(module: torch.nn.Module) -> Dict[str, Any]:
    """A module's state (small buffers) as exact JSON (float32/float64 values round-trip)."""
    return {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape),
                "data": v.detach().cpu().reshape(-1).tolist()} for k, v in module.state_dict().items()}


def _tensors_from_json(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    return {k: torch.tensor(v["data"], dtype=getattr(torch, v["dtype"])).reshape(v["shape"])
            for k, v in state.items()}


def _view_config(view_cfg) -> ViewConfig:
    """``view_cfg`` (ViewConfig, DictConfig or dict) as a validated ViewConfig."""
    if isinstance(view_cfg, ViewConfig):
        return view_cfg
    if isinstance(view_cfg, (dict, DictConfig)):
        try:
            return to_object(OmegaConf.merge(OmegaConf.structured(ViewConfig), view_cfg))
        except Exception as exc:
            raise ConfigError(f"view config: {str(exc).splitlines()[0]}") from None
    raise TypeError(f"view config must be a ViewConfig, DictConfig or dict, got {type(view_cfg).__name__}")


# ----------------------------------------------------------------------------- view models


def _save_view_dir(folder: str, denoiser: EDMPrecond, view_cfg, extra: Optional[dict]) -> None:
    if not isinstance(denoiser, EDMPrecond):
        raise TypeError(f"save_view_model: expected an EDMPrecond denoiser, got {type(denoiser).__name__}")
    net_info = _save_net(denoiser.net, os.path.join(folder, "net"), "save_view_model")
    coords = {"image_size": list(denoiser.image_size)} if isinstance(denoiser, CoordPrecond) else {}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "view",
                "precond": "edm-coords" if coords else "edm", **coords, "sigma_data": float(denoiser.sigma_data), **net_info,
                "net_folder": "net",
                "view": OmegaConf.to_container(OmegaConf.structured(_view_config(view_cfg)),
                                               enum_to_str=True),
                "extra": dict(extra or {})}
    _write_manifest(folder, manifest)


def _load_view_dir(folder: str, url: str, device=None) -> Tuple[EDMPrecond, ViewConfig]:
    manifest = _read_manifest(folder, "view", url)
    if manifest.get("precond") not in ("edm", "edm-coords"):
        raise ValueError(f"{url}/{MANIFEST}: key 'precond' is {manifest.get('precond')!r}, expected 'edm' or 'edm-coords'")
    net = _load_net(os.path.join(folder, manifest.get("net_folder", "net")), manifest, url)
    if manifest["precond"] == "edm-coords":  # a position-aware patch model (views.<v>.coords)
        denoiser = CoordPrecond(net, float(manifest["sigma_data"]), manifest["image_size"]).eval()
    else:
        denoiser = EDMPrecond(net, float(manifest["sigma_data"])).eval()
    view_cfg = _view_config(manifest.get("view", {}))
    denoiser.view_cfg = view_cfg  # kept so save_bootstrap_model can record it
    return (denoiser.to(device) if device is not None else denoiser), view_cfg


def save_view_model(denoiser: EDMPrecond, url: str, view_cfg, extra: Optional[dict] = None) -> None:
    """Export an EDM-preconditioned view model to the folder ``url`` (see module docstring).

    ``view_cfg``: the view's `ViewConfig` (or a dict / DictConfig of it); ``extra``: any
    JSON-serialisable dict kept in the manifest (e.g. training step, data manifest URL).
    The older argument order ``(denoiser, view_cfg, url)`` is accepted too.
    """
    if isinstance(url, (ViewConfig, dict, DictConfig)) and isinstance(view_cfg, (str, os.PathLike)):
        url, view_cfg = view_cfg, url
    with atomic_dir(str(url)) as stage:
        _save_view_dir(stage, denoiser, view_cfg, extra)


def load_view_model(url: str, device=None) -> Tuple[EDMPrecond, ViewConfig]:
    """Load a folder written by `save_view_model`: ``(EDMPrecond in eval mode, ViewConfig)``."""
    with _read_folder(str(url)) as folder:
        return _load_view_dir(folder, str(url), device)


# ----------------------------------------------------------------------------- bootstrapped model


def save_bootstrap_model(model, url: str, extra: Optional[dict] = None) -> None:
    """Export a `bootdiff.residual.BootstrapDenoiser` (view models, fusion, range adapter,
    residual) to the folder ``url`` (see module docstring). The fitted stage-2 constants (fusion
    weights, r(σ); docs/METHOD.md §3, §5) are written as exact values."""
    if not isinstance(model, BootstrapDenoiser):
        raise TypeError(f"save_bootstrap_model: expected a BootstrapDenoiser, got {type(model).__name__}")
    combined, residual = model.combined, model.residual
    if not isinstance(residual, ResidualPrecond):
        raise TypeError(f"save_bootstrap_model: residual must be a ResidualPrecond, got {type(residual).__name__}")
    if model.range_adapter is not None and not isinstance(model.range_adapter, RangeAdapter):
        raise TypeError(f"save_bootstrap_model: range_adapter must be a RangeAdapter or None, got "
                        f"{type(model.range_adapter).__name__}")
    with atomic_dir(str(url)) as stage:
        views = []
        for i, vm in enumerate(combined.view_models):
            folder = f"views/{i:02d}"
            denoiser = combined.denoiser(vm)
            if not isinstance(denoiser, EDMPrecond):
                raise TypeError(f"save_bootstrap_model: view model '{vm.name}' is a "
                                f"{type(denoiser).__name__}, expected an EDMPrecond")
            if not isinstance(vm.view, View):
                raise TypeError(f"save_bootstrap_model: view model '{vm.name}' has a view of type "
                                f"{type(vm.view).__name__}; expected a bootdiff.views view")
            view_cfg = getattr(denoiser, "view_cfg", None) or _view_config(vm.view.config())
            os.makedirs(os.path.join(stage, folder))
            _save_view_dir(os.path.join(stage, folder), denoiser, view_cfg, {"name": vm.name})
            with open(os.path.join(stage, folder, "COMPLETE"), "w") as f:
                f.write("ok\n")
            views.append({"name": vm.name, "folder": folder, "view": vm.view.to_json()})
        res_info = _save_net(residual.net, os.path.join(stage, "residual", "net"), "save_bootstrap_model")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "bootstrap",
            "views": views, "fusion": combined.fusion,
            "fusion_weights": None if combined.weights is None else _tensors_to_json(combined.weights),
            "range_adapter": None if model.range_adapter is None else _tensors_to_json(model.range_adapter),
            "residual": {"precond": "residual", "sigma_data": float(residual.sigma_data),
                         "net_folder": "residual/net", **res_info},
            "extra": dict(extra or {}),
        }
        _write_manifest(stage, manifest)


def load_bootstrap_model(url: str, device=None):
    """Load a folder written by `save_bootstrap_model` as a `BootstrapDenoiser` in eval mode. The
    fusion weights and r(σ) are the saved values, never re-estimated (no data is read)."""
    from bootdiff.fusion import CombinedDenoiser, FusionWeights, ViewModel

    url = str(url)
    with _read_folder(url) as folder:
        m = _read_manifest(folder, "bootstrap", url)
        view_models = []
        for i, v in enumerate(m["views"]):
            where = f"{url}/{MANIFEST}: views[{i}]"
            denoiser, _ = _load_view_dir(os.path.join(folder, v["folder"]), f"{url}/{v['folder']}")
            view_models.append(ViewModel(v["name"], view_from_json(v["view"], where), denoiser))
        weights = None
        if m.get("fusion_weights") is not None:
            state = _tensors_from_json(m["fusion_weights"])
            weights = FusionWeights(torch.ones(state["log_sigma"].shape[0]).cumsum(0).tolist(),
                                    state["weights"].shape[1])
            weights.load_state_dict(state)
        combined = CombinedDenoiser(view_models, fusion=m["fusion"], weights=weights)
        adapter = None
        if m.get("range_adapter") is not None:
            state = _tensors_from_json(m["range_adapter"])
            adapter = RangeAdapter(0.0, 1.0, torch.zeros(state["values"].shape[0]))
            adapter.load_state_dict(state)
        r = m["residual"]
        net = _load_net(os.path.join(folder, r["net_folder"]), r, url)
        residual = ResidualPrecond(net, float(r["sigma_data"]))
        model = BootstrapDenoiser(combined, residual, adapter).eval()
    return model.to(device) if device is not None else model
