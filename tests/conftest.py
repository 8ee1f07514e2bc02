"""Fixtures shared by the test files; plain helpers are in ``helpers.py``.

- ``tiny`` / ``builder``: the tiny random Llama (``model=tiny``) and a prompt builder for it,
  loaded once per module.
- ``restore_torch_threads``: gives the session its torch thread count back after a run changed it.
"""

from __future__ import annotations

import pytest

from helpers import tiny_spec


@pytest.fixture(scope="module")
def tiny():
    """``(model, tokenizer)`` of the tiny random Llama (shared in the module: copy before training)."""
    from calibrl.models import load_policy

    return load_policy(tiny_spec())


@pytest.fixture(scope="module")
def builder(tiny):
    """A :class:`calibrl.data.prompts.PromptBuilder` over the tiny model's tokenizer."""
    from calibrl.data.prompts import PromptBuilder

    return PromptBuilder(tiny[1], "Answer in tags.")


@pytest.fixture(scope="module")
def restore_torch_threads():
    """pipeline.run calls torch.set_num_threads; give the rest of the session its setting back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
