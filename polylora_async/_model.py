"""MultiLoraModel: wraps any nn.Module so each batch row can run with its own LoRA adapter."""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._batch import BatchContext, BatchState, MixedSharedInputError
from ._config import BASE_ADAPTER, WrapConfig, check_adapter_id
from ._errors import (
    AdapterNotFoundError,
    BatchInputError,
    ConfigError,
    PolyLoraWarning,
    SlotsFullError,
    TargetModulesError,
)
from ._heads import HeadSpec, MultiLoraHead, find_heads, width_probe
from ._layer import MultiLoraLinear, linear_features
from ._patches import apply_patches
from .adapters import (
    AdapterWeights,
    LayerShape,
    RawAdapter,
    pack_weights,
    raw_from_peft_model,
    raw_from_state_dict,
    read_peft_directory,
    validate_adapter,
    validate_weights,
    view_at,
)
from .kernels import build_batch_meta

AdapterSource = str | os.PathLike[str] | RawAdapter | AdapterWeights


class MultiLoraModel(nn.Module):
    """A model whose targeted ``nn.Linear`` (or GPT-2 ``Conv1D``) layers serve a different LoRA adapter on every row.

    Wrapping replaces the targeted layers in place (the wrapped module is modified and owned by
    this object). Adapters are loaded into slots; a forward pass names an adapter id per row, or
    :data:`BASE_ADAPTER` for the plain base model.

    Example::

        model = MultiLoraModel(llama, WrapConfig(target_modules=["q_proj", "v_proj"], max_rank=16))
        model.load_adapter("support-bot", "/adapters/support-bot")
        out = model(input_ids=ids, attention_mask=mask, adapter_ids=["support-bot", "__base__"])

    Args:
        model: the base model; its parameters are not changed.
        config: which layers to wrap, ``max_rank`` and the number of slots.

    Raises:
        TargetModulesError: ``target_modules`` matches nothing, or a module that is neither
            ``nn.Linear`` nor ``Conv1D`` (the message names its path and type).
    """

    def __init__(self, model: nn.Module, config: WrapConfig) -> None:
        super().__init__()
        if not isinstance(config, WrapConfig):
            raise ConfigError(f"`config` must be a WrapConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self._state = BatchState()
        self._lock = threading.RLock()
        self._layers: dict[str, MultiLoraLinear] = {}
        self._heads: dict[str, MultiLoraHead] = {}
        self._layers.update(_wrap_layers(model, config, self._state))
        self._heads.update(_wrap_heads(model, config, self._state, list(self._layers)))
        self.patched_modules = apply_patches(model, self._state)
        # slot -> adapter id; slot 0 is the base model.
        self._slot_owner: list[str | None] = [BASE_ADAPTER] + [None] * config.num_slots
        self._slot_of: dict[str, int] = {}
        # The adapter store that owns every slot, if any (weakly: a store dropped without
        # aclose() does not keep the slots forever).
        self._slot_manager: weakref.ref[object] | None = None
        self._split_mode = False
        self.split_batches = 0
        """How many batches ran split into adapter-homogeneous groups (see :meth:`forward`)."""

    # -- wrapping ---------------------------------------------------------------------------------

    @property
    def head_names(self) -> list[str]:
        """Names of the wrapped head modules (``modules_to_save``), as paths inside the model."""
        return list(self._heads)

    def head_specs(self) -> dict[str, HeadSpec]:
        return {n: h.spec for n, h in self._heads.items()}

    def head_widths(self, slots: Sequence[int]) -> dict[str, list[int]]:
        """Per-row output widths of the wrapped heads whose width varies among ``slots``.

        A batch whose rows use heads of different output sizes (e.g. 3 and 10 labels) gets, from
        such a head, a tensor as wide as the widest along the head's last axis; a row's values
        beyond its own width are NaN. This says how wide each row really is.

        Args:
            slots: the batch's slot per row (as given to :meth:`forward_slots`).

        Returns:
            Head module name -> output width per row, only for heads whose output is padded for
            some row (its width is below the head's output width in this batch, which is the
            widest of the model's own head and the rows' copies); an empty dict otherwise.
        """
        widths: dict[str, list[int]] = {}
        for name, head in self._heads.items():
            per_row = [int(head.width_of(s) or 0) for s in slots]
            # The head's output is as wide as the widest of its own module and the rows' copies (its
            # own module runs on every row), so even a batch of one narrower head is padded.
            if any(w != max(head.spec.width or 0, *per_row) for w in per_row):
                widths[name] = per_row
        return widths

    @contextlib.contextmanager
    def head_width_probe(self, name: str) -> Iterator[None]:
        """While active, the wrapped head ``name`` returns one extra NaN column on its output axis
        (its last) for every row: comparing a forward pass with a normal one shows which axes of
        the model's outputs follow that head's width. It holds the model's lock while active:
        forward passes from other threads wait until it ends.

        Raises:
            KeyError: ``name`` is not a wrapped head.
        """
        head = self._heads.get(name)
        if head is None:
            raise KeyError(f"{name!r} is not a wrapped head module (wrapped: {sorted(self._heads)})")
        with self._lock, width_probe(head):
            yield

    @property
    def layer_names(self) -> list[str]:
        """Names of the wrapped layers, as paths inside the wrapped model."""
        return list(self._layers)

    def layer_shapes(self) -> dict[str, LayerShape]:
        return {
            n: LayerShape(layer.in_features, layer.out_features, conv1d=layer.is_conv1d)
            for n, layer in self._layers.items()
        }

    @property
    def dtype(self) -> torch.dtype:
        return self._first_layer().lora_a.dtype

    @property
    def device(self) -> torch.device:
        return self._first_layer().lora_a.device

    def _first_layer(self) -> MultiLoraLinear:
        return next(iter(self._layers.values()))

    # -- adapters ---------------------------------------------------------------------------------

    def prepare_adapter(
        self,
        adapter_id: str,
        source: AdapterSource | Any,
        *,
        peft_adapter_name: str | None = None,
        pin_memory: bool = False,
    ) -> AdapterWeights:
        """Read and validate an adapter for this model without placing it in a slot.

        Args:
            adapter_id: the id it will be served under.
            source: a PEFT adapter directory, a ``peft.PeftModel`` (with ``peft_adapter_name``),
                a ``(state_dict, config)`` tuple, a :class:`RawAdapter`, or :class:`AdapterWeights`
                (checked against this model's layers like the others: shapes, ranks, finite values).
            pin_memory: keep the validated weights in page-locked memory (needs CUDA), ready for
                asynchronous copies to the device.

        Raises:
            AdapterLoadError, AdapterFormatError, UnsupportedAdapterError: the adapter is unusable;
                the message names the adapter, the file or module, and the value.
        """
        check_adapter_id(adapter_id)
        if isinstance(source, AdapterWeights):
            return validate_weights(
                adapter_id,
                source,
                self.layer_shapes(),
                self.config.max_rank,
                self.dtype,
                pin_memory=pin_memory,
                heads=self.head_specs(),
            )
        if isinstance(source, RawAdapter):
            raw = source
        elif isinstance(source, (str, os.PathLike)):
            raw = read_peft_directory(adapter_id, source, pin_memory=pin_memory)
        elif hasattr(source, "peft_config"):
            raw = raw_from_peft_model(adapter_id, source, peft_adapter_name)
        elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Mapping):
            raw = raw_from_state_dict(source[0], source[1])
        else:
            raise TypeError(
                f"adapter {adapter_id!r}: unsupported source {type(source).__name__}; expected a directory, "
                "a PeftModel, a (state_dict, config) tuple, RawAdapter or AdapterWeights"
            )
        return validate_adapter(
            adapter_id,
            raw,
            self.layer_shapes(),
            self.config.max_rank,
            self.dtype,
            pin_memory=pin_memory,
            heads=self.head_specs(),
        )

    def load_adapter(
        self, adapter_id: str, source: AdapterSource | Any, *, peft_adapter_name: str | None = None
    ) -> int:
        """Validate an adapter and place it into a free slot; returns the slot.

        Loading an id that is already loaded replaces it (the new version goes to a fresh slot, so
        a failed load leaves the old version serving). Nothing is changed if validation fails.

        Raises:
            SlotsFullError: every slot is taken; :meth:`unload_adapter` one first.
            AdapterLoadError: see :meth:`prepare_adapter`.
        """
        self._check_unmanaged("load_adapter")
        weights = self.prepare_adapter(adapter_id, source, peft_adapter_name=peft_adapter_name)
        with self._lock:
            self._check_unmanaged("load_adapter")
            free = [i for i, owner in enumerate(self._slot_owner) if owner is None]
            if not free:
                raise SlotsFullError(
                    f"cannot load adapter {adapter_id!r}: all {self.config.num_slots} slots are taken "
                    f"({sorted(self._slot_of)}); unload one first"
                )
            slot = free[0]
            self.write_slot(slot, weights)
            old = self._slot_of.get(adapter_id)
            self._slot_owner[slot] = adapter_id
            self._slot_of[adapter_id] = slot
            if old is not None:
                self._slot_owner[old] = None
            return slot

    def unload_adapter(self, adapter_id: str) -> None:
        """Free the slot of a loaded adapter.

        Raises:
            AdapterNotFoundError: the adapter is not loaded.
        """
        with self._lock:
            self._check_unmanaged("unload_adapter")
            slot = self._slot_of.pop(adapter_id, None)
            if slot is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not loaded")
            self._slot_owner[slot] = None

    def claim_slots(self, manager: object) -> None:
        """Hand every slot to ``manager`` (an adapter store): until :meth:`release_slots`, this
        model's own :meth:`load_adapter` / :meth:`unload_adapter` refuse, so no slot has two owners.

        Raises:
            ConfigError: adapters are loaded with :meth:`load_adapter`, or another manager holds
                the slots.
        """
        with self._lock:
            current = self._manager()
            if current is not None and current is not manager:
                raise ConfigError(
                    "the model's slots already belong to another adapter store (every Runtime has one): "
                    "give each runtime its own MultiLoraModel, or close the other one first"
                )
            if self._slot_of:
                raise ConfigError(
                    f"the model already serves adapters loaded with load_adapter() ({sorted(self._slot_of)[:5]}); "
                    "an AdapterStore owns every slot: give it a model without loaded adapters"
                )
            self._slot_manager = weakref.ref(manager)

    def release_slots(self, manager: object) -> None:
        """Give the slots back (``manager`` closed); a no-op for anyone but their holder."""
        with self._lock:
            if self._manager() is manager:
                self._slot_manager = None

    def _manager(self) -> object | None:
        return None if self._slot_manager is None else self._slot_manager()

    def _check_unmanaged(self, what: str) -> None:
        if self._manager() is not None:
            raise ConfigError(
                f"{what}() is unavailable while an adapter store (a Runtime's) owns this model's slots: "
                "register adapters with it (runtime.register_adapter, await runtime.load_adapter) instead"
            )

    @property
    def loaded_adapters(self) -> list[str]:
        return sorted(self._slot_of)

    def slot_of(self, adapter_id: str) -> int:
        """The slot serving ``adapter_id`` (0 for :data:`BASE_ADAPTER`)."""
        if adapter_id == BASE_ADAPTER:
            return 0
        try:
            return self._slot_of[adapter_id]
        except KeyError:
            raise AdapterNotFoundError(
                f"adapter {adapter_id!r} is not loaded (loaded: {sorted(self._slot_of)[:10]})"
            ) from None

    @torch.no_grad()
    def write_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Write validated weights into ``slot`` of every wrapped layer (layers it lacks get rank 0).

        Low level: the caller owns slot bookkeeping and must not write a slot a running batch reads.
        On CUDA every operation is queued on the current stream, none waits for the device: packed
        weights in page-locked memory (:func:`pack_weights`, what the adapter store keeps) go to the
        device in ONE copy, then into every layer's slot with a handful of batched calls
        (``torch._foreach_*``) instead of six calls per layer from Python. That keeps a load's
        host work (which competes for the interpreter with the forward passes) small.
        """
        if not 1 <= slot <= self.config.num_slots:
            raise ValueError(f"slot must be in [1, {self.config.num_slots}], got {slot}")
        unknown = (set(weights.layers) - self._layers.keys()) | (set(weights.heads) - self._heads.keys())
        if unknown:
            raise ValueError(f"adapter {weights.adapter_id!r} was validated for another model: {sorted(unknown)[:3]}")
        packed = pack_weights(weights, pin_memory=False, dtype=self.dtype)
        _write_slot(self._layers, self._heads, slot, packed, self.device)

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, *args: Any, adapter_ids: Sequence[str], **kwargs: Any) -> Any:
        """Run the wrapped model once; row ``i`` uses adapter ``adapter_ids[i]``.

        Every tensor argument whose first dimension equals ``len(adapter_ids)`` is per-row.
        Rows are independent: each gets the output it would get alone with its adapter (within
        dtype tolerance), including rows of different lengths under right padding.

        If the model feeds a tensor shared by all rows into a wrapped layer while rows use
        different adapters, and no patch for that architecture exists, the batch is run again in
        adapter-homogeneous groups (exact, slower; warned once, counted in ``split_batches``).

        Raises:
            BatchInputError: ``adapter_ids`` is empty or does not match the inputs' batch size.
            AdapterNotFoundError: an adapter id is not loaded.
        """
        slots = self._row_slots(adapter_ids, args, kwargs)
        return self.forward_slots(slots, *args, **kwargs)

    def forward_slots(self, slots: Sequence[int], *args: Any, **kwargs: Any) -> Any:
        """Like :meth:`forward`, with slot numbers instead of adapter ids (for schedulers)."""
        with self._lock:
            distinct = set(slots)
            if self._split_mode and len(distinct) > 1:
                self.split_batches += 1
                return self._forward_split(list(slots), args, kwargs)
            try:
                return self._forward_once(list(slots), args, kwargs)
            except MixedSharedInputError as exc:
                self._split_mode = True
                warnings.warn(
                    f"layer {exc.layer_name!r} runs on a tensor shared by all rows and this architecture "
                    f"({type(self.model).__name__}) has no per-row patch: mixed-adapter batches will run "
                    "in adapter-homogeneous groups (exact, but slower)",
                    PolyLoraWarning,
                    stacklevel=3,
                )
                self.split_batches += 1
                return self._forward_split(list(slots), args, kwargs)

    def _forward_once(self, slots: list[int], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._state.current = BatchContext(build_batch_meta(slots, self.device))
        try:
            return self.model(*args, **kwargs)
        finally:
            self._state.current = None

    def _forward_split(self, slots: list[int], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        rows = len(slots)
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            groups.setdefault(slot, []).append(row)
        outputs = []
        for slot, members in groups.items():
            index = torch.tensor(members, dtype=torch.long)
            g_args = _select_rows(args, rows, index)
            g_kwargs = _select_rows(kwargs, rows, index)
            outputs.append((members, self._forward_once([slot] * len(members), g_args, g_kwargs)))
        return _merge_rows(outputs, rows)

    def _row_slots(self, adapter_ids: Sequence[str], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[int]:
        if isinstance(adapter_ids, str) or not isinstance(adapter_ids, Sequence):
            raise BatchInputError(f"`adapter_ids` must be a sequence of adapter ids, got {type(adapter_ids).__name__}")
        if not adapter_ids:
            raise BatchInputError("`adapter_ids` is empty: a batch needs at least one row")
        batch = [t.shape[0] for t in _tensors(args, kwargs) if t.dim() > 0]
        if batch and len(adapter_ids) not in batch:
            raise BatchInputError(
                f"`adapter_ids` has {len(adapter_ids)} entries but the inputs' batch dimension is {batch[0]}"
            )
        return [self.slot_of(a) for a in adapter_ids]

    def iter_layers(self) -> Iterable[MultiLoraLinear]:
        return self._layers.values()


def _wrap_layers(model: nn.Module, config: WrapConfig, state: BatchState) -> dict[str, MultiLoraLinear]:
    """Replace every targeted layer of ``model`` by its :class:`MultiLoraLinear`; name -> wrapper."""
    matched = [(n, m) for n, m in model.named_modules() if n and config.targets(n)]
    if not matched:
        raise TargetModulesError(
            f"`target_modules`={config.target_modules!r} matches no module of {type(model).__name__}"
        )
    wrong = [(n, _type_path(m)) for n, m in matched if linear_features(m) is None]
    # A container whose own name matches (e.g. an `attention` block) is an error only if it was
    # the sole match for that pattern; PEFT reports the same condition.
    if wrong:
        raise TargetModulesError(
            "`target_modules` matches modules that are not nn.Linear (with floating-point weights) or "
            "transformers' Conv1D, so they cannot be wrapped: " + ", ".join(f"{n} ({t})" for n, t in wrong[:5])
        )
    layers = {}
    for name, linear in matched:
        layers[name] = MultiLoraLinear(linear, name, config.num_slots + 1, config.max_rank, state)
        _replace(model, name, layers[name])
    return layers


def _wrap_heads(model: nn.Module, config: WrapConfig, state: BatchState, layers: list[str]) -> dict[str, MultiLoraHead]:
    """Replace every module adapters may save whole (``modules_to_save``) by its :class:`MultiLoraHead`.

    Decided once, at wrap time: a module cannot be swapped for its wrapper while batches run.
    """
    found = find_heads(model, config.modules_to_save, skip=layers)
    if config.modules_to_save is not None:
        unmatched = [p for p in config.modules_to_save if not any(n == p or n.endswith("." + p) for n, _ in found)]
        if unmatched:
            raise TargetModulesError(f"`modules_to_save` entries {unmatched} match no module of {type(model).__name__}")
    heads = {}
    for name, module in found:
        inner = [n for n in layers if n.startswith(name + ".")]
        if inner:
            raise TargetModulesError(
                f"module {name!r} is in `modules_to_save` but also holds LoRA targets {inner[:3]}: "
                "exclude them (`exclude_modules`) or do not save the module"
            )
        heads[name] = MultiLoraHead(module, name, config.num_slots + 1, state)
        _replace(model, name, heads[name])
    return heads


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _write_slot(
    layers: Mapping[str, MultiLoraLinear],
    heads: Mapping[str, MultiLoraHead],
    slot: int,
    packed: AdapterWeights,
    device: torch.device,
) -> None:
    """:meth:`MultiLoraModel.write_slot` once checked: one H2D copy, then a few batched calls for every layer."""
    storage = packed.storage
    assert storage is not None
    staged = storage.to(device, non_blocking=True)  # on the CPU: the storage itself
    base, itemsize = storage.data_ptr(), storage.element_size()

    def on_device(tensor: torch.Tensor) -> torch.Tensor:
        return view_at(staged, (tensor.data_ptr() - base) // itemsize, tensor.shape)

    for name, head in heads.items():
        copy = packed.heads.get(name)
        # Own device memory per slot (the staged storage is freed after this write); cloned on
        # the current stream, so nothing waits for the device.
        head.set_slot(slot, None if copy is None else {k: on_device(t).clone() for k, t in copy.items()})

    targets: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    stale: list[torch.Tensor] = []
    ranks: dict[int, list[torch.Tensor]] = {}
    scales: dict[float, list[torch.Tensor]] = {}
    for name, layer in layers.items():
        lora = packed.layers.get(name)
        if lora is None:
            plan = layer.plan_slot_write(slot, None)
        else:
            plan = layer.plan_slot_write(slot, lora, on_device(lora.a), on_device(lora.b))
        targets += plan.targets
        sources += plan.sources
        stale += plan.stale
        ranks.setdefault(layer.slot_ranks[slot], []).append(plan.rank_entry)
        scales.setdefault(layer.slot_scales[slot], []).append(plan.scale_entry)
    if targets:
        torch._foreach_copy_(targets, sources, non_blocking=True)
    if stale:
        torch._foreach_zero_(stale)
    # The tables take one value per distinct rank / scale (usually one or two): a device tensor
    # filled once, copied into every entry with one batched call.
    for table, dtype in ((ranks, torch.int32), (scales, torch.float32)):
        for value, entries in table.items():
            fill = torch.full((1,), value, dtype=dtype, device=entries[0].device)
            torch._foreach_copy_(entries, [fill] * len(entries))


def _type_path(module: nn.Module) -> str:
    """A module's class with where it comes from, e.g. ``torch.nn.modules.sparse.Embedding``."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _tensors(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterable[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


def _select_rows(value: Any, rows: int, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == rows:
            return value.index_select(0, index.to(value.device))
        return value
    if isinstance(value, tuple):
        return tuple(_select_rows(v, rows, index) for v in value)
    if isinstance(value, list):
        return [_select_rows(v, rows, index) for v in value]
    if isinstance(value, dict):
        return {k: _select_rows(v, rows, index) for k, v in value.items()}
    return value


def _merge_rows(outputs: list[tuple[list[int], Any]], rows: int) -> Any:
    """Reassemble per-group outputs into one batch-ordered output of the same structure."""
    first = outputs[0][1]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0 or first.shape[0] != len(outputs[0][0]):
            raise BatchInputError("a model output is not per-row; the batch cannot be split by adapter")
        # Groups whose heads have different output widths differ in the last axis only: the merged
        # tensor is as wide as the widest, narrower rows padded with NaN (as in one mixed batch).
        width = max(out.shape[-1] for _, out in outputs) if first.dim() > 1 else None
        if width is not None and any(out.shape[-1] != width for _, out in outputs):
            merged = first.new_full((rows, *first.shape[1:-1], width), math.nan)
        else:
            merged = first.new_empty((rows, *first.shape[1:]))
        for members, out in outputs:
            index = torch.tensor(members, device=merged.device)
            if out.shape[-1] != merged.shape[-1]:
                merged[index, ..., : out.shape[-1]] = out
            else:
                merged[index] = out
        return merged
    if first is None:
        return None
    if isinstance(first, Mapping):
        values = {k: _merge_rows([(m, o[k]) for m, o in outputs], rows) for k in first.keys()}
        try:
            return type(first)(**values)
        except TypeError:
            return dict(values)
    if isinstance(first, (tuple, list)):
        items = [_merge_rows([(m, o[i]) for m, o in outputs], rows) for i in range(len(first))]
        return type(first)(items)
    return first
