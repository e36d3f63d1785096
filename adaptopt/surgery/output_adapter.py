"""The output layer's adapter: a LoRA adapter on a language model's head (``get_output_embeddings()``)
that trains for the whole run, outside the policy's decisions (docs/optimizer.md, "The output layer").

Why: on a language model the head maps the last hidden state to the vocabulary, and what a new
corpus changes first is which tokens are likely; the blocks alone adapt that slowly. Training the
head fully costs a dense ``vocab × hidden`` gradient and AdamW state (and, tied, a second gradient
of the input embeddings); an adapter costs ``r·(vocab + hidden)`` parameters and ``r/hidden`` of the
head's matmul.

A tied head (``tie_word_embeddings``: the head *is* the input embedding matrix) is first given its
own copy of the weight, so nothing done to the head — the adapter, a merge, a FULL move — changes
the input embeddings. The copy costs ``vocab × hidden`` weights (no gradient, no optimizer state);
the model's config then says ``tie_word_embeddings = False``, so a saved folder loads untied, with
the trained head, in transformers and in servers that read the flag (vLLM). The layer remembers
where its weight came from (``weight_source``), so an unchanged copy is read back from the base
model's input embeddings rather than stored (``adaptopt/formats/hf_folders.py``).
"""
from __future__ import annotations

import copy
from typing import Callable

from torch import nn


def output_layer_name(model: nn.Module, linear_like: Callable[[nn.Module], bool]) -> str | None:
    """The module name of the model's output layer (``get_output_embeddings()``, adapted or not), or
    ``None`` for a model without one (a classifier) or whose output layer is not linear-like."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not linear_like(getattr(head, "base", head)):  # an adapted head: its base layer
        return None
    return next((name for name, m in model.named_modules() if m is head and name), None)


def tied_partners(model: nn.Module) -> Callable[[str], str | None]:
    """``name → `` the name of another parameter that *is* module ``name``'s weight (a tied input
    embedding), or ``None``; the model's parameters are listed once, for any number of names."""
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)

    def partner(name: str) -> str | None:
        weight = model.get_submodule(name).weight
        return next((n for n in owners.get(id(weight), []) if not n.startswith(name + ".")), None)
    return partner


def with_own_weight(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose ``weight`` is a fresh copy (same values, dtype, device,
    ``requires_grad``); its other parameters (a bias) stay shared."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=module.weight.requires_grad)
    return clone


def untie_config(model: nn.Module) -> Callable[[], None]:
    """Set ``tie_word_embeddings = False`` on the model's config (and its text config); returns the undo."""
    configs = [c for c in {id(c): c for c in _configs(model)}.values() if hasattr(c, "tie_word_embeddings")]
    before = [(c, c.tie_word_embeddings) for c in configs]
    for c in configs:
        c.tie_word_embeddings = False

    def undo() -> None:
        for c, value in before:
            c.tie_word_embeddings = value
    return undo


def _configs(model: nn.Module) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
    return [config] + ([text] if text is not None else [])
