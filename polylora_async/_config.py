"""Configuration of the model wrapper."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ._errors import ConfigError

BASE_ADAPTER = "__base__"
"""The adapter id that means "no adapter": the row runs through the unmodified base model."""


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
        if not isinstance(self.max_rank, int) or isinstance(self.max_rank, bool) or self.max_rank < 1:
            raise ConfigError(f"`max_rank` must be an integer >= 1, got {self.max_rank!r}")
        if not isinstance(self.num_slots, int) or isinstance(self.num_slots, bool) or self.num_slots < 1:
            raise ConfigError(f"`num_slots` must be an integer >= 1, got {self.num_slots!r}")

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
