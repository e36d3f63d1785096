"""How a pattern selects modules and parameters: the one name dialect of adaptopt.

Used alike by :func:`~adaptopt.inject_adapters` (``targets``), the policies (``Fixed``'s
assignment) and :class:`~adaptopt.AdaptiveOptimizer` (``trainable=`` / ``frozen=``).

A pattern is a regular expression. It matches a dotted name when it ``fullmatch``-es a
*run* of the name's components, i.e. the name of the module itself or of any module that
contains it, written from any depth (docs/design.md §5):

- ``"query"`` matches ``encoder.layer.0.attention.self.query`` (a tail);
- ``"classifier"`` matches ``classifier.dense.weight`` (every tensor inside ``classifier``);
- ``r"layer\\.[0-2]"`` matches everything inside blocks 0–2;
- ``"bias"`` matches ``encoder.layer.0.output.LayerNorm.bias``.

A plain module name is a regex that matches itself, so PEFT-style name lists work unchanged.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Iterable, Pattern, Union

NamePattern = Union[str, Pattern[str]]

# the input embeddings and the output layer, under the names common architectures give them (BERT,
# Llama, GPT-2, ...): what LISA trains throughout, and AdaptiveOptimizer(train_embeddings=) switches
EMBEDDINGS = ("embed_tokens", "word_embeddings", "wte", "wpe", "position_embeddings", "token_type_embeddings",
              "embeddings", "lm_head")

# the dense layers between an encoder and a classifier's head (BERT's pooler, DistilBERT's pre_classifier):
# Full trains them, PEFT's modules_to_save does not; Hybrid trains them with the head (head_inputs=True)
HEAD_INPUTS = ("pooler", "pre_classifier")


def output_layer(model) -> tuple[str, ...]:
    """Exact patterns for the parameters of the model's output layer (``get_output_embeddings()``:
    a language model's head, which a tied model shares with its input embeddings); ``()`` for a
    model without one (a classifier's head trains anyway)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return ()
    own = {id(p) for p in head.parameters()}
    return tuple(re.escape(name) for name, p in model.named_parameters() if id(p) in own)


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid name pattern {pattern!r}: {exc}. Patterns are regular expressions; "
                         "escape dots and brackets (re.escape) to match a name literally") from exc


def compile_pattern(pattern: NamePattern) -> Pattern[str]:
    """``pattern`` compiled (a ``ValueError`` naming it if it is not a valid regex)."""
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise ValueError(f"a name pattern must be a string or a compiled regex, got {pattern!r}")
    return _compiled(pattern)


def runs(name: str) -> list[str]:
    """Every run of consecutive dotted components: ``"a.b.c"`` → ``a.b.c, a.b, a, b.c, b, c``."""
    parts = name.split(".")
    return [".".join(parts[i:j]) for i in range(len(parts)) for j in range(len(parts), i, -1)]


def matcher(patterns: NamePattern | Iterable[NamePattern]) -> Callable[[str], bool]:
    """A predicate: does any of ``patterns`` fullmatch a run of a name's dotted components?"""
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    compiled = [compile_pattern(p) for p in patterns]

    def matches(name: str) -> bool:
        return any(regex.fullmatch(run) for run in runs(name) for regex in compiled)
    return matches


def name_matches(pattern: NamePattern, name: str) -> bool:
    """True if ``pattern`` fullmatches a run of ``name``'s dotted components (see the module docstring)."""
    return matcher(pattern)(name)
