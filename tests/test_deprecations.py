"""The suite's warning policy: a deprecation raised from UnitedLLM's own code fails the test that hits it."""

from __future__ import annotations

import warnings

import pytest


def _warn_from(module: str, category: type[Warning]) -> None:
    code = compile("import warnings\nwarnings.warn('old API', category)\n", f"<{module}>", "exec")
    exec(code, {"__name__": module, "category": category})


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_a_deprecation_from_our_code_is_an_error(category: type[Warning]) -> None:
    with pytest.raises(category, match="old API"):
        _warn_from("unitedllm.training.model", category)


def test_a_deprecation_from_the_build_tool_is_an_error() -> None:
    with pytest.raises(DeprecationWarning):
        _warn_from("unitedllm_build.builder", DeprecationWarning)


def test_activation_checkpointing_uses_the_current_transformers_api() -> None:
    """transformers 5 deprecates gradient_checkpointing_enable; our model builder must not call it there."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from unitedllm.training.model import _enable_activation_checkpointing

    tiny = GPTNeoXConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = GPTNeoXForCausalLM(tiny)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _enable_activation_checkpointing(model)
    assert [str(w.message) for w in seen] == []
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
