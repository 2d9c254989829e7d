"""Loading an experiment config: a YAML file (any fsspec URL) over the schema's defaults, then
``key=value`` overrides, then the cross-field rules (`bootdiff.config.check`), so every mistake
that can be seen without opening the data fails at load, before any work. An override may add a
view only by naming its kind (``views.NAME.kind=...``), so a typo in a view name is an error.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bootdiff.config.check import check as check_config
from bootdiff.config.schema import ConfigError, ExperimentConfig, ViewKind, _error, full_res_budget, structured


def _with_toggle_bools(node: Any) -> Any:
    """YAML reads ``channels_last: true`` as a boolean; a `Toggle` takes it as ``"true"``."""
    if isinstance(node, dict):
        return {k: ("true" if v else "false") if k == "channels_last" and isinstance(v, bool)
                else _with_toggle_bools(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_with_toggle_bools(v) for v in node]
    return node


def _merge(cfg: DictConfig, loaded: DictConfig, origin: str) -> DictConfig:
    try:
        plain = OmegaConf.to_container(loaded, resolve=False)
        return OmegaConf.merge(cfg, OmegaConf.create(_with_toggle_bools(plain)))
    except OmegaConfBaseException as exc:
        raise _error(exc, origin) from None


def _check_new_views(cfg: DictConfig, dot: DictConfig, overrides: Sequence[str]) -> None:
    """An override may add a view only by naming its kind: ``views.lwo.train.total_kimg=1`` (a
    typo of ``low``) is an error naming the known views, not a new default patch view."""
    views = dot.get("views") if isinstance(dot, DictConfig) else None
    if not isinstance(views, DictConfig) or "views" not in cfg:
        return
    known = list(cfg.views.keys())
    for name in views.keys():
        if name in known:
            continue
        node = views[name]
        if not isinstance(node, DictConfig) or "kind" not in node:
            item = next((o for o in overrides if o.split("=", 1)[0].strip().startswith(f"views.{name}")),
                        f"views.{name}")
            raise ConfigError(f"command line: '{item}' names an unknown view '{name}' (known views: "
                              f"{', '.join(known) or 'none'}); to add a view, also set "
                              f"views.{name}.kind=<{' | '.join(k.value for k in ViewKind)}>")


def _fill_full_res_budget(cfg: DictConfig) -> None:
    """``full_res.train.total_kimg`` left unset -> `full_res_budget` (set explicitly, it is kept)."""
    if "full_res" in cfg and OmegaConf.is_missing(cfg.full_res.train, "total_kimg"):
        try:
            cfg.full_res.train.total_kimg = full_res_budget(cfg)
        except OmegaConfBaseException as exc:
            raise _error(exc, "full_res.train.total_kimg (unset: the views' total_kimg + the residual's)") from None


def _fill_seeds(cfg: DictConfig) -> None:
    """Every model's ``train.seed`` left unset -> the top-level ``seed`` (set explicitly, it is kept)."""
    if "seed" not in cfg:
        return
    trains = [cfg[k].train for k in ("full_res", "residual", "distill") if k in cfg]
    trains += [v.train for v in cfg.get("views", {}).values() if "train" in v]
    for t in trains:
        if t.get("seed") is None:
            t.seed = cfg.seed


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                schema: type = ExperimentConfig, check: bool = True) -> DictConfig:
    """Load ``path`` (YAML, any fsspec URL) over the schema's defaults, then apply ``overrides``,
    then fill an unset ``full_res.train.total_kimg`` (`full_res_budget`) and every unset
    ``train.seed`` (the top-level ``seed``), then (for an
    `ExperimentConfig`, unless ``check=False``) run `bootdiff.config.check.check`.

    Raises ``ConfigError`` naming the key and the file (or the command line) for an unknown key,
    a value of the wrong type or outside a choice's values, malformed YAML, an override that
    would add a view without a kind, or a broken cross-field rule.
    """
    cfg = structured(schema)
    overrides = list(overrides or [])
    if path:
        from bootdiff.util import url_fs

        fs, p = url_fs(path)
        if not fs.exists(p):
            raise ConfigError(f"config file not found: {path}")
        with fs.open(p, "r") as f:
            text = f.read()
        try:
            loaded = OmegaConf.create(text)
        except Exception as exc:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: cannot parse YAML: {exc}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got a list")
        cfg = _merge(cfg, loaded, path)
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"command line: override '{item}' is not of the form key=value")
        try:
            dot = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as exc:
            raise _error(exc, "command line") from None
        _check_new_views(cfg, dot, overrides)
        cfg = _merge(cfg, dot, "command line")
    _fill_full_res_budget(cfg)
    _fill_seeds(cfg)
    if check and issubclass(schema, ExperimentConfig):
        check_config(cfg, path or "defaults", overrides)
    return cfg

