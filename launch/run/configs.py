"""The launcher configurations ftctl ships (`ds_configs/`, `accelerate_configs/`): finding one by name or path,
reading it, and what it says about the launch (DeepSpeed stage, offload, processes)."""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path
from typing import Any

import yaml

from ftctl.errors import FtctlError

REPO = Path(__file__).resolve().parent.parent  # the source checkout, or site-packages when installed


def shipped(folder: str) -> Path:
    """A folder of files ftctl ships (`ds_configs`, `accelerate_configs`, `recipes`): data-only packages of the
    distribution, found through importlib.resources wherever ftctl is installed (the repository's own folder in a
    checkout or an editable install)."""
    return Path(str(importlib.resources.files(folder)))


ACCELERATE_CONFIGS = shipped("accelerate_configs")
DS_CONFIGS = shipped("ds_configs")
RECIPES = shipped("recipes")


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the processes ftctl starts (launcher, grid cells): ftctl's own packages first on the path,
    and never the current directory ahead of them (PYTHONSAFEPATH), so a user's folder named `tasks/` or
    `methods/` cannot shadow them."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1", **(extra or {})}


def deepspeed_config(ref: str | None) -> str | None:
    """A DeepSpeed config by name (ds_configs/NAME.json) or path, checked to parse; its absolute path."""
    if not ref:
        return None
    path = Path(ref)
    if not path.suffix and not path.exists():
        path = DS_CONFIGS / f"{ref}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in DS_CONFIGS.glob("*.json")))
        raise FtctlError(f"DeepSpeed config not found: {ref}; use a JSON path or one of: {names}")
    read_deepspeed(path)
    return str(path.resolve())


def read_deepspeed(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FtctlError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization", {}), dict):
        raise FtctlError(f"DeepSpeed config {path} must be a JSON object with a zero_optimization object")
    return config


def resolve_accelerate_config(ref: str) -> Path:
    path = Path(ref)
    if not path.suffix and not path.exists():
        path = ACCELERATE_CONFIGS / f"{ref}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
        raise FtctlError(f"accelerate config not found: {ref}; use a path or one of: {names}")
    return path


def read_accelerate(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise FtctlError(f"accelerate config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise FtctlError(f"accelerate config {path} must be a mapping")
    return data


def accelerate_deepspeed_file(config: dict[str, Any]) -> Path | None:
    """The DeepSpeed JSON an accelerate config names, found as accelerate would (the shipped configs name paths
    relative to the repository root)."""
    ref = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not ref:
        return None
    return shipped_deepspeed(str(ref))


def shipped_deepspeed(ref: str) -> Path:
    """A DeepSpeed file an accelerate config names: the path as given when it exists, else the shipped file of that
    name (the shipped accelerate configs name `ds_configs/<file>`, relative to the repository)."""
    path = Path(ref)
    if path.is_file() or path.parent.name != DS_CONFIGS.name or not (DS_CONFIGS / path.name).is_file():
        return path
    return DS_CONFIGS / path.name


def deepspeed_settings(config: dict[str, Any]) -> dict[str, Any]:
    """(stage, offload, own optimizer) of a DeepSpeed JSON config."""
    zero = config.get("zero_optimization") or {}
    offload = any(
        str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "")
        for key in ("offload_optimizer", "offload_param")
    )
    return {"stage": int(zero.get("stage", 0)), "offload": offload, "optimizer": "optimizer" in config}
