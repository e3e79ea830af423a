"""Shared pytest fixtures over the helpers of tests/_models.py."""

from __future__ import annotations

import pytest

from tests._models import DEBERTA_ADAPTERS, LLAMA_ADAPTERS, AdapterSet, save_peft_adapters, tiny_deberta_v3, tiny_llama


@pytest.fixture(scope="module")
def llama_set(tmp_path_factory: pytest.TempPathFactory) -> AdapterSet:
    return save_peft_adapters(tiny_llama(), LLAMA_ADAPTERS, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def deberta_set(tmp_path_factory: pytest.TempPathFactory) -> AdapterSet:
    return save_peft_adapters(tiny_deberta_v3(), DEBERTA_ADAPTERS, tmp_path_factory.mktemp("deberta"))
