"""PEFT's argument names, accepted beside ours everywhere (docs/design.md §5).

PEFT → adaptopt: ``r`` → ``rank``, ``lora_alpha`` → ``alpha``, ``lora_dropout`` → ``dropout``,
``target_modules`` → ``targets``, ``use_rslora`` → ``rslora``, ``init_lora_weights`` → ``init``
(``True`` or ``"pissa"``).

:func:`accepts_peft_names` lets a function take either spelling (both at once is an error);
the Python API and the YAML configs go through it, so ``r=16`` means the same in both.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, TypeVar

PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
              "use_rslora": "rslora", "init_lora_weights": "init"}

F = TypeVar("F", bound=Callable[..., Any])


def with_our_names(kwargs: Mapping[str, Any], accepted: Any, where: str) -> dict[str, Any]:
    """``kwargs`` with every PEFT name whose counterpart ``accepted`` holds renamed to ours.
    Raises ``TypeError`` naming both when a value comes under both names."""
    out = dict(kwargs)
    for peft, ours in PEFT_NAMES.items():
        if peft in out and ours in accepted:
            if ours in out:
                raise TypeError(f"{where}: got both {peft}= (PEFT's name) and {ours}= for the same setting; pass one")
            out[ours] = out.pop(peft)
    return out


def accepts_peft_names(function: F) -> F:
    """Decorate ``function`` so that PEFT's names of its parameters work as keywords."""
    accepted = set(inspect.signature(function).parameters)
    method = "self" in accepted  # a constructor: name the class being built (a subclass, maybe)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        where = type(args[0]).__name__ if method and args else function.__qualname__
        return function(*args, **with_our_names(kwargs, accepted, where))

    return call  # type: ignore[return-value]
