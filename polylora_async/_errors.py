"""The exception hierarchy: everything the library raises on purpose derives from PolyLoraError."""

from __future__ import annotations


class PolyLoraError(Exception):
    """Raised when polylora-async refuses or fails an operation; the base of every error it raises."""


class PolyLoraWarning(UserWarning):
    """Issued when something is accepted but deserves attention (unknown config keys, slow paths)."""


class ConfigError(PolyLoraError, ValueError):
    """Raised when a configuration object has an invalid field; the message names the field and value."""


class TargetModulesError(ConfigError):
    """Raised when ``target_modules`` matches nothing, or matches a module that is not ``nn.Linear``."""


class AdapterNotFoundError(PolyLoraError, KeyError):
    """Raised when an adapter id is not known to the model or runtime."""

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class AdapterLoadError(PolyLoraError):
    """Raised when an adapter cannot be read: a missing, truncated or corrupt file.

    The message names the adapter and the file.
    """


class AdapterFormatError(AdapterLoadError, ValueError):
    """Raised when an adapter was read but is not valid for this model.

    Shapes that don't fit the base layer, ranks above ``max_rank``, NaN/Inf weights, weights for
    modules that are not wrapped. The message names the adapter, the module or field, and the value.
    """


class UnsupportedAdapterError(AdapterFormatError):
    """Raised when an adapter uses a PEFT feature this runtime does not serve (DoRA, LoRA bias, ...)."""


class SlotsFullError(PolyLoraError):
    """Raised when every adapter slot is taken and none may be evicted."""


class BatchInputError(PolyLoraError, ValueError):
    """Raised when a batch's inputs are invalid: wrong adapter count, empty batch, bad shapes."""
