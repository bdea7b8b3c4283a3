"""YAML training configs with ``--set section.key=value`` overrides, one reader for every entry point
(train/cris.py, train/clip_pretrain.py, train/unpair_seg/)."""

from __future__ import annotations

from typing import Iterable

import yaml


def apply_overrides(cfg: dict, overrides: Iterable[str] = ()) -> dict:
    """``cfg`` with ``"section.key=value"`` overrides applied in place (values parsed as YAML; missing sections are
    created; a dotted path through a non-mapping raises ``ValueError``). Returns ``cfg``."""
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected section.key=value, got {item!r}")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {p!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return cfg


def read_config(path: str, what: str, overrides: Iterable[str] = ()) -> dict:
    """The YAML mapping at ``path`` (``what`` names the config in the error when it is not a mapping) with
    ``overrides`` applied."""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: {what} config must be a mapping of sections, got {type(cfg).__name__}")
    return apply_overrides(cfg, overrides)
