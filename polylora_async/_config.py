"""Configuration shared by the package: the base adapter id, the wrapper's config, and shared validators."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ._errors import ConfigError

BASE_ADAPTER = "__base__"
"""The adapter id that means "no adapter": the row runs through the unmodified base model."""


def check_adapter_id(
    adapter_id: object, field: str = "adapter_id", *, allow_base: bool = False, error: type[Exception] = ValueError
) -> str:
    """An adapter id is a non-empty string; :data:`BASE_ADAPTER` only where ``allow_base``.

    ``error`` is the type the caller documents: ``ValueError`` for the model and the store,
    :class:`InputValidationError` for a request's ``adapter``.
    """
    if not isinstance(adapter_id, str) or not adapter_id:
        raise error(f"`{field}` must be a non-empty string (adapter ids are), got {adapter_id!r}")
    if adapter_id == BASE_ADAPTER and not allow_base:
        raise error(f"`{field}`: {BASE_ADAPTER!r} is reserved for the base model")
    return adapter_id


def check_int(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    """A config field that must be an integer (never a bool) >= ``minimum`` (or None if ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"`{name}` must be an integer{' or None' if optional else ''}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"`{name}` must be >= {minimum}, got {value}")


def check_seconds(name: str, value: object) -> None:
    """A config field that must be a finite number of seconds >= 0 (never a bool)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise ConfigError(f"`{name}` must be >= 0, got {value}")


@dataclass(frozen=True)
class WrapConfig:
    """Which layers of a model get multi-LoRA support, and how much room adapters get.

    Args:
        target_modules: module names matched the way PEFT matches them: a list of names, each
            matching a module whose full name equals it or ends with ``"." + name``; or a single
            string, taken as a regular expression that must match the full module name.
        max_rank: the largest LoRA rank any adapter may have in any layer.
        num_slots: how many adapters can be resident at once (on the model's device), not
            counting the base model, which always has slot 0.
        exclude_modules: names (same matching rules) never wrapped even if targeted.
        modules_to_save: modules adapters may carry whole copies of (PEFT's ``modules_to_save``,
            e.g. classification heads), matched like a ``target_modules`` list; each matching
            module (outermost matches only) is wrapped at wrap time so every slot can hold its own
            copy. ``None`` (the default): the modules PEFT saves for ``SEQ_CLS`` / ``TOKEN_CLS``
            adapters, ``classifier`` and ``score``, where the model has them; ``()``: none.
    """

    target_modules: Sequence[str] | str
    max_rank: int = 64
    num_slots: int = 8
    exclude_modules: Sequence[str] | str | None = None
    modules_to_save: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.modules_to_save is not None:
            names = self.modules_to_save
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"`modules_to_save` must be a list of module names, got {names!r}")
            object.__setattr__(self, "modules_to_save", tuple(names))
        _check_patterns("target_modules", self.target_modules, allow_none=False)
        _check_patterns("exclude_modules", self.exclude_modules, allow_none=True)
        if isinstance(self.target_modules, (list, set)):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.exclude_modules, (list, set)):
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        check_int("max_rank", self.max_rank, 1)
        check_int("num_slots", self.num_slots, 1)

    def targets(self, module_name: str) -> bool:
        """Whether the module with this full (dotted) name is targeted and not excluded."""
        if self.exclude_modules is not None and name_matches(self.exclude_modules, module_name):
            return False
        return name_matches(self.target_modules, module_name)


def name_matches(patterns: Sequence[str] | str, module_name: str) -> bool:
    """PEFT's matching rule: a regex must match the whole name; a list entry matches a dotted suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def _check_patterns(field: str, value: object, *, allow_none: bool) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"`{field}` must be a list of module names or a regex string, got None")
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"`{field}` must not be an empty string")
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"`{field}` is not a valid regular expression: {value!r} ({exc})") from None
        return
    if not isinstance(value, (list, tuple, set, frozenset)) or not value:
        raise ConfigError(f"`{field}` must be a non-empty list of module names or a regex, got {value!r}")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise ConfigError(f"`{field}` entries must be non-empty strings, got {bad!r}")
