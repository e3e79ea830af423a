"""The exception hierarchy: everything the library raises on purpose derives from PolyLoraError."""

from __future__ import annotations


class PolyLoraError(Exception):
    """Raised when polylora-async refuses or fails an operation; the base of every error it raises."""


class PolyLoraWarning(UserWarning):
    """Issued when something is accepted but deserves attention (unknown config keys, slow paths)."""


class ConfigError(PolyLoraError, ValueError):
    """Raised when a configuration object has an invalid field; the message names the field and value."""


class TargetModulesError(ConfigError):
    """Raised when ``target_modules`` matches nothing, or a module that is neither ``nn.Linear`` nor ``Conv1D``."""


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


class OverloadedError(PolyLoraError):
    """Raised by ``submit_nowait`` when the runtime's bounded queue is full (back off and retry)."""


class RuntimeClosedError(PolyLoraError):
    """Raised when a request is made to a runtime that is closing or closed, or was dropped by a
    cancelling shutdown. You closed it; compare :class:`WorkerCrashedError`."""


class WorkerCrashedError(PolyLoraError):
    """Raised when the runtime's scheduler or GPU worker failed; every pending request gets it and
    the runtime accepts no more work. It broke; compare :class:`RuntimeClosedError`."""


class BatchFailedError(PolyLoraError):
    """Raised for each request of a batch whose forward pass raised; the cause is chained."""


class RequestTimeoutError(PolyLoraError, TimeoutError):
    """Raised when a request's ``timeout`` passes before its result is ready."""


class InputValidationError(BatchInputError):
    """Raised when a submitted request's inputs are unusable: empty, mismatched lengths, wrong dtype or shape."""


class AdapterNotReadyError(PolyLoraError):
    """Raised when a batch lease names an adapter whose GPU slot write has not been issued yet.

    Await ``AdapterStore.ensure_gpu`` (or use ``AdapterStore.acquire_lease``) before leasing.
    """


class StoreClosedError(PolyLoraError):
    """Raised when an operation needs an adapter store (or its catalog) that was closed with ``aclose()``.

    Pending loads and resolutions fail with it when the store closes, so no waiter hangs.
    """
