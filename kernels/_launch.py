"""Launching a @triton.jit kernel many times with the least host work.

``kernel[grid](*args)`` costs tens of microseconds of Python per call in triton 3.6 (binding and
specialising every argument, building a cache key from the options, checking globals, then the
launcher asks the driver about every tensor pointer). A LoRA layer launches the same few
specialisations thousands of times, so :class:`FastLauncher` does that work once per specialisation
and afterwards calls the compiled kernel's own launcher (``CompiledKernel.run``, the call
``JITFunction.run`` ends with, identical in triton 3.6 and 3.9) with plain integer pointers.

Correctness rests on the cache key: the compiled kernel is specialised on each pointer's element
type and 16-byte alignment and on the integer arguments (value 1, divisibility by 16). The key
holds the activations' dtype (the caller's ``dtype``: in the SGMV kernels every other pointer has a
fixed element type, int32 tables, fp32 scales and intermediates, which the checked entry points
verify and the trusted one is guaranteed), every integer argument as it is, the meta-parameters and
the options; calls whose pointers are not all 16-byte aligned always go through ``kernel[grid]``
(triton then specialises them itself). Without the dtype in the key, a bf16 call would reuse the
fp16 compilation of the same shapes. Whatever cannot be cached (the
interpreter, an unexpected triton version, a launch hook such as a profiler's) takes the ordinary
path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["FastLauncher", "fast_launch_enabled"]

# Entries per launcher before the cache is cleared (each is a few hundred bytes; a serving process
# sees a handful of shapes, so this only bounds pathological callers).
_MAX_ENTRIES = 4096


def fast_launch_enabled() -> bool:
    """``POLYLORA_FAST_LAUNCH=0`` turns the cached launches off (every call uses ``kernel[grid]``)."""
    return os.environ.get("POLYLORA_FAST_LAUNCH", "1") != "0"


def _default_stream_getter() -> Callable[[int], int] | None:
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return getter if callable(getter) else None


def _default_device_getter() -> Callable[[], int]:
    getter = getattr(torch._C, "_cuda_getDevice", None)
    return getter if callable(getter) else torch.cuda.current_device


def _runtime_knobs() -> Any:
    """triton's runtime knobs (launch hooks), or None where this triton has none."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return knobs.runtime


def _hooks_empty(knobs: Any) -> bool:
    """No launch hook to call: each hook is None or an empty chain.

    triton 3.6-3.9 keep the hooks as ``HookChain`` objects (never None) with a ``calls`` list; a
    profiler adds to it. Anything else that is not None counts as a hook.
    """
    for hook in (knobs.launch_enter_hook, knobs.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class FastLauncher:
    """Per-kernel cache of compiled specialisations, launched without triton's per-call binding.

    Args:
        get_kernel: returns the @triton.jit kernel to launch (looked up per call, so a test can
            swap the kernel in its module).
        enabled: cache compiled kernels at all (default: :func:`fast_launch_enabled` at creation).
    """

    def __init__(self, get_kernel: Callable[[], Any], *, enabled: bool | None = None) -> None:
        self._get_kernel = get_kernel
        self._enabled = fast_launch_enabled() if enabled is None else enabled
        self._compiled: dict[tuple[Any, ...], tuple[Any, Any, tuple[Any, ...]]] = {}
        self._stream_of: Callable[[int], int] | None = _default_stream_getter()
        self._device_getter: Callable[[], int] = _default_device_getter()
        self._knobs: Any = None  # resolved at the first cached launch (triton is imported by then)

    def clear(self) -> None:
        self._compiled.clear()

    def launch(
        self,
        grid: int,
        tensors: tuple[torch.Tensor, ...],
        scalars: tuple[int, ...],
        constexprs: dict[str, Any],
        options: tuple[int, int],
        dtype: torch.dtype,
    ) -> None:
        """Launch ``kernel[(grid,)](*tensors, *scalars, **constexprs, num_warps=, num_stages=)``.

        ``tensors`` are the kernel's leading pointer parameters, ``scalars`` its integer
        parameters after them, ``constexprs`` the rest in signature order; ``options`` is
        ``(num_warps, num_stages)``; ``dtype`` is the activations' dtype, which with the
        kernel's fixed dtypes for its other pointers determines every pointer's element type.
        """
        kernel = self._get_kernel()
        if self._enabled and tensors[0].is_cuda:
            ptrs = [t.data_ptr() for t in tensors]
            aligned = True
            for p in ptrs:
                if p & 15:
                    aligned = False
                    break
            if aligned:
                device = self._device_getter()
                key = (device, dtype, scalars, tuple(constexprs.values()), options)
                entry = self._compiled.get(key)
                knobs = self._knobs
                if entry is not None and entry[0] is kernel and self._stream_of is not None:
                    # A launch hook (a profiler's) must see every launch: leave those to triton.
                    if knobs is not None and _hooks_empty(knobs):
                        _, compiled, tail = entry
                        compiled.run(
                            grid, 1, 1, self._stream_of(device), compiled.function, compiled.packed_metadata,
                            None, None, None, *ptrs, *scalars, *tail,
                        )  # fmt: skip
                        return
                compiled = kernel[(grid,)](
                    *tensors, *scalars, **constexprs, num_warps=options[0], num_stages=options[1]
                )
                self._remember(key, kernel, compiled, len(tensors) + len(scalars), constexprs)
                return
        kernel[(grid,)](*tensors, *scalars, **constexprs, num_warps=options[0], num_stages=options[1])

    def _remember(
        self, key: tuple[Any, ...], kernel: Any, compiled: Any, num_args: int, constexprs: dict[str, Any]
    ) -> None:
        # Only what JITFunction.run returns in triton 3.6-3.9: a loaded CompiledKernel.
        if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            return
        names = getattr(kernel, "arg_names", None)
        if names is None or list(names[num_args:]) != list(constexprs):
            return  # constexprs not the trailing parameters in this order: keep the ordinary path
        if self._knobs is None:
            self._knobs = _runtime_knobs()
            if self._knobs is None:
                return
        if len(self._compiled) >= _MAX_ENTRIES:
            self._compiled.clear()
        self._compiled[key] = (kernel, compiled, tuple(constexprs.values()))
