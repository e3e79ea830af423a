"""A PEFT LoRA config read for serving: supported fields, refused features, per-module ranks and scales."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import (
    AdapterFormatError,
    PolyLoraWarning,
    UnsupportedAdapterError,
)

# Config keys whose presence (truthy value) changes the forward pass in ways this runtime does not
# implement: each is refused by name rather than silently served wrong. Serving one of them is
# removing its entry here (every other field of PEFT's LoraConfig is accepted: _lora_config_keys).
_UNSUPPORTED_FLAGS: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA bias on lora_B",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters (`target_parameters`)",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA input pooling",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron parallel layers",
}

_warned_unknown_keys: set[frozenset[str]] = set()
_warned_fan_in_fan_out: set[tuple[str, bool]] = set()


@functools.cache
def _lora_config_keys() -> frozenset[str]:
    """The fields of PEFT's ``LoraConfig`` (those of its base config included).

    These are the keys a saved ``adapter_config.json`` holds. Those not refused by
    :data:`_UNSUPPORTED_FLAGS` (or `bias`) do not change what a loaded adapter computes at
    inference: initialisation, training-time settings, bookkeeping, or coverage that the saved
    weights already express. Any other key draws a warning. Imported on first use: importing
    PEFT takes seconds (it imports transformers), too much for ``import polylora_async``.
    """
    from peft import LoraConfig

    return frozenset(f.name for f in dataclasses.fields(LoraConfig))


@dataclass(frozen=True)
class _LoraSpec:
    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    fan_in_fan_out: bool = False

    @classmethod
    def parse(cls, where: str, config: Mapping[str, Any], *, warn_unknown: bool = True) -> _LoraSpec:
        """The config's LoRA settings; refuses unsupported features and malformed fields.

        ``warn_unknown``: warn (once per set of keys) about keys PEFT's ``LoraConfig`` does not
        have; that needs PEFT imported (seconds), which a registration-time check avoids.
        """
        raw_type = config.get("peft_type", "LORA")
        peft_type = str(getattr(raw_type, "value", raw_type))  # an enum when taken from a live PeftModel
        if peft_type.upper() != "LORA":
            raise UnsupportedAdapterError(f"{where}: field `peft_type` is {peft_type!r}; only 'LORA' is served")
        for key, feature in _UNSUPPORTED_FLAGS.items():
            value = config.get(key)
            if value not in (None, False, [], {}, ()):
                raise UnsupportedAdapterError(f"{where}: field `{key}`={value!r}: {feature} is not supported")
        bias = config.get("bias", "none")
        if bias != "none":
            raise UnsupportedAdapterError(f"{where}: field `bias`={bias!r}: LoRA bias is not supported")
        unknown = frozenset(config) - _lora_config_keys() if warn_unknown else frozenset()
        if unknown and unknown not in _warned_unknown_keys:
            _warned_unknown_keys.add(unknown)
            warnings.warn(
                f"{where}: ignoring unknown adapter_config keys {sorted(unknown)}", PolyLoraWarning, stacklevel=4
            )
        r = config.get("r", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterFormatError(f"{where}: field `r` must be an integer >= 1, got {r!r}")
        alpha = config.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise AdapterFormatError(f"{where}: field `lora_alpha` must be a finite number, got {alpha!r}")
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            if not isinstance(pattern, Mapping):
                raise AdapterFormatError(f"{where}: field `{name}` must be a mapping, got {pattern!r}")
            for key, value in pattern.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise AdapterFormatError(f"{where}: field `{name}`[{key!r}] must be a number, got {value!r}")
        fan_in_fan_out = config.get("fan_in_fan_out", False)
        if not isinstance(fan_in_fan_out, bool):
            raise AdapterFormatError(f"{where}: field `fan_in_fan_out` must be true or false, got {fan_in_fan_out!r}")
        return cls(
            r=r,
            alpha=float(alpha),
            use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            fan_in_fan_out=fan_in_fan_out,
        )

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def scale_for(self, module: str, rank: int) -> float:
        alpha = float(_pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first key that matches a dotted suffix of the module path (as a regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
