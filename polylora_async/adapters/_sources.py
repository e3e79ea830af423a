"""Reading adapter sources into :class:`RawAdapter`: PEFT directories, live PeftModels, state dicts."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._errors import (
    AdapterFormatError,
    AdapterLoadError,
)
from ._safetensors import read_safetensors
from ._types import RawAdapter

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"


def read_peft_directory(
    adapter_id: str, path: str | os.PathLike[str], *, pin_memory: bool = False
) -> RawAdapter:
    """Read a PEFT adapter directory (``adapter_config.json`` + weights) without validating it.

    ``adapter_model.safetensors`` is preferred and read in one piece into one buffer (page-locked
    with ``pin_memory``, so weights of the model's dtype never need another host copy);
    ``adapter_model.bin`` is read only through ``torch.load(weights_only=True)``, which refuses
    arbitrary pickled objects.

    Raises:
        AdapterLoadError: the directory or a file is missing, truncated or corrupt.
    """
    root = Path(path)
    config = _read_config(adapter_id, root)
    weights_path = _weights_file(adapter_id, root)
    buffer = None
    if weights_path.name == SAFETENSORS_FILE:
        tensors, buffer = read_safetensors(adapter_id, weights_path, pin_memory=pin_memory)
    else:
        tensors = _read_torch_pickle(adapter_id, weights_path)
    return RawAdapter(config=config, tensors=tensors, origin=str(root), buffer=buffer)


def _read_config(adapter_id: str, root: Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT directory, as a dict.

    Raises:
        AdapterLoadError: ``root`` is not a directory, or the file is missing or not a JSON object.
    """
    if not root.is_dir():
        raise AdapterLoadError(f"adapter {adapter_id!r}: {str(root)!r} is not a directory")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in root.glob(f"*/{CONFIG_FILE}"))
        hint = f"; sub-folders holding one: {nested}" if nested else ""
        raise AdapterLoadError(f"adapter {adapter_id!r}: missing {str(config_path)!r}{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"adapter {adapter_id!r}: cannot parse {str(config_path)!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(
            f"adapter {adapter_id!r}: {str(config_path)!r} must hold a JSON object, got {type(config).__name__}"
        )
    return config


def _weights_file(adapter_id: str, root: Path) -> Path:
    """``adapter_model.safetensors`` if the directory has one, else ``adapter_model.bin``.

    Raises:
        AdapterLoadError: it has neither.
    """
    for name in (SAFETENSORS_FILE, PICKLE_FILE):
        if (root / name).is_file():
            return root / name
    raise AdapterLoadError(
        f"adapter {adapter_id!r}: no weights in {str(root)!r} (expected {SAFETENSORS_FILE} or {PICKLE_FILE})"
    )


def _read_torch_pickle(adapter_id: str, path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise AdapterLoadError(
            f"adapter {adapter_id!r}: cannot read {str(path)!r} with the safe loader: {exc}"
        ) from exc
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise AdapterLoadError(f"adapter {adapter_id!r}: {str(path)!r} does not hold a dict of tensors")
    return loaded


def raw_from_peft_model(adapter_id: str, peft_model: Any, adapter_name: str | None = None) -> RawAdapter:
    """Take one named adapter out of an in-memory ``peft.PeftModel`` (weights copied to CPU)."""
    from peft import get_peft_model_state_dict

    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, Mapping):
        raise AdapterFormatError(f"adapter {adapter_id!r}: {type(peft_model).__name__} is not a PeftModel")
    name = adapter_name if adapter_name is not None else getattr(peft_model, "active_adapter", "default")
    if name not in configs:
        raise AdapterFormatError(
            f"adapter {adapter_id!r}: the PeftModel has no adapter named {name!r} (it has {sorted(configs)})"
        )
    config = configs[name].to_dict()
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    return RawAdapter(config=config, tensors=tensors, origin=f"PeftModel adapter {name!r}")


def raw_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | Any, origin: str = "state dict"
) -> RawAdapter:
    """Wrap a PEFT-style state dict and its config (a dict or a ``peft.LoraConfig``)."""
    if not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        if to_dict is None:
            raise AdapterFormatError(f"{origin}: config must be a mapping or a peft.LoraConfig")
        config = to_dict()
    return RawAdapter(config=dict(config), tensors=dict(state_dict), origin=origin)
