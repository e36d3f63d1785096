"""PEFT's argument names, accepted beside ours everywhere (docs/design.md §5).

PEFT → adaptopt: ``r`` → ``rank``, ``lora_alpha`` → ``alpha``, ``lora_dropout`` → ``dropout``,
``target_modules`` → ``targets`` (``"all-linear"`` means what it means in PEFT), ``use_rslora`` →
``rslora``, ``init_lora_weights`` → ``init`` (``True`` or ``"pissa"``). ``modules_to_save``, ``bias``
and ``task_type`` are taken where they mean something here (:func:`peft_trainable`).

:func:`accepts_peft_names` lets a function take either spelling (both at once is an error);
the Python API and the YAML configs go through it, so ``r=16`` means the same in both.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, TypeVar

PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "targets",
              "use_rslora": "rslora", "init_lora_weights": "init"}
# PEFT's task_type, read from the model's class name (what export_peft writes, what task_type= is checked against)
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM"}
BIAS = ("none", "all", "lora_only")

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


def task_type_of(model: Any) -> str | None:
    """PEFT's ``task_type`` for ``model``'s class (``...ForCausalLM`` → ``"CAUSAL_LM"``), or ``None``."""
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if name.endswith(suffix)), None)


def peft_trainable(model: Any, layer_names: list[str], bias: str = "none", modules_to_save: Any = None,
                   task_type: str | None = None) -> tuple[str, ...]:
    """Name patterns (the ``trainable=`` dialect) for PEFT's ``modules_to_save`` (those modules train
    fully), ``bias`` (``"all"``: every bias; ``"lora_only"``: the adapted layers' biases; ``"none"``)
    — and a check of ``task_type``, which adaptopt reads from the model's class. Raises
    ``ValueError`` naming the value and the equivalent."""
    import re
    if bias not in BIAS:
        raise ValueError(f"bias={bias!r}: PEFT's values are {list(BIAS)} ('all' trains every bias, 'lora_only' the "
                         "adapted layers' biases; adaptopt's equivalent is trainable=['bias'])")
    if modules_to_save is not None and (isinstance(modules_to_save, str) or not all(
            isinstance(m, str) and m for m in modules_to_save)):
        raise ValueError(f"modules_to_save must be a list of module names (they train fully, as trainable=[...] "
                         f"does), got {modules_to_save!r}")
    if task_type is not None:
        ours = task_type_of(model)
        if str(task_type).upper() not in TASK_TYPES.values():
            raise ValueError(f"task_type={task_type!r} is not one of PEFT's {sorted(TASK_TYPES.values())}")
        if ours is not None and str(task_type).upper() != ours:
            raise ValueError(f"task_type={task_type!r}, but the model is a {type(model).__name__} ({ours}): adaptopt "
                             "reads the task from the model's class (export_peft writes it); drop task_type")
    patterns = list(modules_to_save or ())
    if bias == "all":
        patterns.append("bias")
    elif bias == "lora_only":
        patterns += [rf"{re.escape(name)}\.base\.bias" for name in layer_names]
    return tuple(patterns)
