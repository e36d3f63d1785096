"""Find a model's target layers and swap them for adapter modules, in place.

``targets`` may be:

- ``"auto"``: the known linear names of the architecture (``model.config.model_type``),
  inside numbered blocks; unknown architectures fall back to every linear layer except
  output heads (``lm_head``, ``classifier``, ``score``).
- ``"all-linear"``: PEFT's meaning: every linear layer except the output layer (the output
  embeddings and those heads), outside blocks too.
- a name pattern, or a list of them (any one matching selects): :mod:`adaptopt.name_patterns`'
  dialect, a regex that fullmatches a run of the module name's dotted components
  (``"query"`` matches ``encoder.layer.0.attention.self.query``; ``r"layer\\.[0-2]"``
  every linear layer inside blocks 0–2; ``r"(query|value)"``). Only linear layers
  (``nn.Linear``, GPT-2 ``Conv1D``) are selected.

Every target gets a :class:`TargetInfo`: its block (the name up to the first numeric
component, e.g. ``model.layers.3``) and its type (the name after it, e.g.
``self_attn.q_proj``), which policies group by.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Pattern, Union

from torch import nn

from ..layers.base_kinds import is_conv1d, is_quantized_linear
from ..layers.factors import check_init, check_rank_alpha
from ..layers.layout import Layout
from ..layers.lora import LoRALinear
from ..layers.quant import QuantConfig, QuantLoRALinear
from ..modes import Mode
from ..name_patterns import matcher
from ..peft_arguments import accepts_peft_names
from .output_adapter import output_layer_name, tied_partners, untie_config, with_own_weight
from .swap import ModuleSwap

Targets = Union[str, Pattern[str], Iterable[str]]

_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BERT_LIKE = ("query", "key", "value", "dense")
ARCHITECTURE_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "gemma3_text", "qwen2",
                     "qwen2_moe", "qwen3", "qwen3_moe", "olmo", "olmo2", "granite", "smollm3"), _LLAMA_LIKE),
    **dict.fromkeys(("gpt2",), ("c_attn", "c_proj", "c_fc")),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT_LIKE),
    **dict.fromkeys(("distilbert",), ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")),
}
OUTPUT_HEADS = ("lm_head", "classifier", "score")
DEFAULT_RANK, DEFAULT_ALPHA = 8, 16.0


@dataclass(frozen=True)
class TargetInfo:
    """Where a target layer sits in its model.

    ``name="model.layers.3.self_attn.q_proj"`` gives ``block_name="model.layers.3"``,
    ``block_index=3``, ``layer_type="self_attn.q_proj"``. Layers outside numbered blocks
    have ``block_name=block_index=None`` and their full name as ``layer_type``.
    """

    name: str
    block_name: str | None
    block_index: int | None
    layer_type: str

    @classmethod
    def from_name(cls, name: str) -> "TargetInfo":
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                layer_type = ".".join(parts[i + 1:]) or ".".join(parts[:i]) or "layer"
                return cls(name, ".".join(parts[:i + 1]), int(part), layer_type)
        return cls(name, None, None, name)


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _is_head(name: str) -> bool:
    return any(part in OUTPUT_HEADS for part in name.split("."))


def find_adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapter modules already in ``model``, by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def warn_if_rewrapped(existing: Mapping[str, LoRALinear], rank: int | None, alpha: float | None) -> None:
    """The model already has adapters, which are used as they are: say so when the caller asked
    for a rank or alpha they do not have (nothing is re-injected)."""
    import warnings
    ranks = sorted({m.rank for m in existing.values()})
    alphas = sorted({m.alpha for m in existing.values()})
    asked = [(label, value, have) for label, value, have in (("rank", rank, ranks), ("alpha", alpha, alphas))
             if value is not None and have != [value]]
    if asked:
        detail = "; ".join(f"{label}={value!r} requested, the adapters have {label} {have}"
                           for label, value, have in asked)
        warnings.warn(f"the model already has {len(existing)} adapter layers, which are used as they are: {detail}. "
                      "Inject into a fresh model to change them, or call set_mode(..., rank=) on a layer",
                      stacklevel=3)


def require_adapters(model: nn.Module, action: str) -> dict[str, LoRALinear]:
    """The model's adapter layers, or a ``ValueError`` saying how to get some."""
    layers = find_adapters(model)
    if not layers:
        raise ValueError(f"cannot {action}: the model has no adapter layers (build an AdaptiveOptimizer on it or "
                         "call adaptopt.inject_adapters first)")
    return layers


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules outside existing adapters (a wrapped ``x.base`` is never a target)."""
    inside = [name + "." for name in find_adapters(model)]
    return [(name, m) for name, m in model.named_modules()
            if name and not any(name.startswith(prefix) for prefix in inside)]


def _auto_targets(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = ARCHITECTURE_TARGETS.get(model_type or "")
    if names:
        chosen = [name for name, m in candidates if _is_linear_like(m) and name.rsplit(".", 1)[-1] in names
                  and TargetInfo.from_name(name).block_index is not None and not _is_head(name)]
        if chosen:
            return chosen
    return [name for name, m in candidates if _is_linear_like(m) and not _is_head(name)]


def _all_linear(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> list[str]:
    """PEFT's ``target_modules="all-linear"``: every linear layer except the output layer (the model's
    output embeddings, and the heads ``lm_head`` / ``classifier`` / ``score``)."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return [name for name, m in candidates if _is_linear_like(m) and not _is_head(name) and m is not output]


def select_targets(model: nn.Module, targets: Targets = "auto") -> list[str]:
    """Names of the modules ``targets`` selects (see the module docstring), in model order.

    Raises ``ValueError`` if nothing matches, or if an explicit target is not a linear layer.
    """
    candidates = _candidates(model)
    if isinstance(targets, str) and targets == "auto":
        chosen = _auto_targets(model, candidates)
    elif isinstance(targets, str) and targets == "all-linear":
        chosen = _all_linear(model, candidates)
    else:
        if isinstance(targets, (str, re.Pattern)):
            matches = matcher(targets)
        elif isinstance(targets, Iterable):
            wanted = list(targets)
            if not wanted or not all(isinstance(t, (str, re.Pattern)) for t in wanted):
                raise ValueError(f"targets must be 'auto', a regex or a non-empty list of names, got {targets!r}")
            unmatched = [t for t in wanted if not any(matcher(t)(name) for name, _ in candidates)]
            if unmatched and len(unmatched) < len(wanted):
                raise ValueError(f"targets {unmatched} match no module of {type(model).__name__} (the others do): "
                                 "check the spelling against model.named_modules(), or drop them")
            matches = matcher(wanted)
        else:
            raise ValueError(f"targets must be 'auto', a regex or a list of names, got {targets!r}")
        chosen = [name for name, _ in candidates if matches(name)]
        modules = dict(candidates)
        not_linear = [f"{name} ({type(modules[name]).__name__})" for name in chosen
                      if not _is_linear_like(modules[name])]
        # a name like "attention" also matches containers; keep only their linear leaves then
        if not_linear and len(not_linear) == len(chosen):
            raise ValueError(f"targets {targets!r} matched only non-linear modules: {', '.join(not_linear[:8])}. "
                             "adaptopt adapts nn.Linear and GPT-2 Conv1D layers: name those instead")
        chosen = [name for name in chosen if _is_linear_like(modules[name])]
    if not chosen:
        raise ValueError(f"no target layers matched targets={targets!r} in {type(model).__name__}: pass "
                         "targets=[...] with names from model.named_modules(), or a regex")
    _refuse_tied(model, chosen)
    return chosen


def output_adapter_target(model: nn.Module, required: bool) -> str | None:
    """The name of the output layer an output adapter goes on; ``None`` when the model has none
    (a classifier), or a ``ValueError`` if ``required``."""
    name = output_layer_name(model, _is_linear_like)
    if name is None and required:
        raise ValueError(f"{type(model).__name__} has no linear output layer (get_output_embeddings() is None): "
                         "train_embeddings='output_lora' is for language models; a classifier's head trains anyway")
    return name


def _refuse_tied(model: nn.Module, chosen: list[str]) -> None:
    """A target whose weight is shared with another module (a tied ``lm_head`` and input
    embedding) cannot be adapted: folding an update into it would move the other module too."""
    partner = tied_partners(model)
    for name in chosen:
        other = partner(name)
        if other is not None:
            raise ValueError(
                f"target {name!r} shares its weight with {other!r} (tied weights, e.g. "
                "tie_word_embeddings=True): a LoRA merge or a FULL move would change both. Leave "
                f"{name!r} out of targets and pass AdaptiveOptimizer(train_embeddings='output_lora') (an "
                "adapter on the output layer, over its own copy of the weight), or untie it first "
                f"(model.config.tie_word_embeddings = False; {name}.weight = "
                f"nn.Parameter({name}.weight.detach().clone()))")


@accepts_peft_names
def inject_adapters(model: nn.Module, targets: Targets = "auto", rank: int = 8, alpha: float = 16.0, *,
                    dropout: float = 0.0, rslora: bool = False, mode: Mode | str = Mode.LORA,
                    quantize: QuantConfig | str | Mapping[str, Any] | None = None,
                    init: str = "default", output_adapter: bool = False) -> dict[str, LoRALinear]:
    """Swap ``model``'s target layers for :class:`LoRALinear` (or :class:`QuantLoRALinear` with
    ``quantize="nf4"|"fp4"|{...}``), in place, and return them by module name.

    Right after injection (``mode=LORA``, ``B = 0``) the model computes exactly what it did
    (with ``quantize``, up to the 4-bit rounding of the base weights). ``init="pissa"`` starts
    every adapter from its weight's principal part instead (the function is unchanged too).
    ``output_adapter=True`` adapts a language model's output layer too, as the optimizer's output
    adapter (over its own copy of a tied weight; never 4-bit): for adapters injected before
    ``fully_shard``, where the optimizer finds them in place (docs/optimizer.md, "The output layer").

    Raises ``ValueError`` for no matching targets, rank ≤ 0, alpha ≤ 0 or an unknown quant
    type, and ``ImportError`` when bitsandbytes is needed but missing; on any error the
    model is left exactly as it was.
    """
    head = output_adapter_target(model, required=True) if output_adapter else None
    return inject_with_undo(model, targets, rank, alpha, dropout=dropout, rslora=rslora, mode=mode,
                            quantize=quantize, init=init, output_adapter=head)[0]


def inject_with_undo(model: nn.Module, targets: Targets = "auto", rank: int = 8, alpha: float = 16.0, *,
                     dropout: float = 0.0, rslora: bool = False, mode: Mode | str = Mode.LORA,
                     quantize: QuantConfig | str | Mapping[str, Any] | None = None, init: str = "default",
                     output_adapter: str | None = None) -> tuple[dict[str, LoRALinear], ModuleSwap]:
    """:func:`inject_adapters`, also returning the :class:`~adaptopt.surgery.swap.ModuleSwap` whose
    ``undo()`` takes the adapters back out (the optimizer's constructor rolls back with it).

    ``output_adapter``: the output layer's name (:func:`output_adapter_target`), adapted too — in
    LORA whatever ``mode`` says, never 4-bit, and over its own copy of the weight when it is tied
    (:mod:`adaptopt.surgery.output_adapter`)."""
    check_rank_alpha(rank, alpha)
    mode = Mode.coerce(mode)
    init = check_init(init)
    if init == "pissa" and quantize is not None:
        raise ValueError("init='pissa' cannot go with quantize: a 4-bit base is never rewritten, and PiSSA moves "
                         "the weight's principal part out of it; use one or the other")
    existing = find_adapters(model)
    if existing:
        raise ValueError(f"the model already has {len(existing)} adapters (first: {next(iter(existing))!r}); "
                         "use adaptopt.find_adapters(model) to get them, or inject into a fresh model")
    quant = None if quantize is None else QuantConfig.coerce(quantize)
    names = select_targets(model, targets)
    if output_adapter is not None and output_adapter not in names:
        names.append(output_adapter)
    tied_to = tied_partners(model)(output_adapter) if output_adapter is not None else None
    if quant is not None:
        from .._imports import require
        require("bitsandbytes", extra="quant")
    modules = dict(model.named_modules())
    swap = ModuleSwap(model)
    wrapped: dict[str, LoRALinear] = {}
    try:
        modes = {name: Mode.LORA if name == output_adapter else mode for name in names}  # the output adapter: LoRA
        for name in names:
            base = modules[name]
            if name == output_adapter and tied_to is not None:
                base = with_own_weight(base)
            if (quant is not None and name != output_adapter) or is_quantized_linear(base):
                module = QuantLoRALinear(base, rank, alpha, dropout, rslora, mode=modes[name],
                                         quantize=quant or QuantConfig(), init=init)
            else:  # PiSSA rewrites the base weight: only once every layer is built and swapped in
                module = LoRALinear(base, rank, alpha, dropout, rslora, init=init,
                                    mode=Mode.FROZEN if init == "pissa" else modes[name])
            module.target = TargetInfo.from_name(name)
            wrapped[name] = module
        for name, module in wrapped.items():
            swap.put(name, module)
        if tied_to is not None:
            wrapped[output_adapter].weight_source = tied_to
            swap.on_undo(untie_config(model))
        if init == "pissa":
            for name, module in wrapped.items():
                module.set_mode(modes[name])
    except BaseException:
        swap.undo()
        raise
    return wrapped, swap


def build_layer(base: nn.Module, layout: Layout, name: str | None = None) -> LoRALinear:
    """A :class:`~adaptopt.LoRALinear` (or ``QuantLoRALinear`` for a 4-bit layout) over
    ``base`` in ``layout``'s structure, its factors fresh (to be overwritten by a load)."""
    args = (base, layout.rank, layout.alpha, layout.dropout, layout.rslora)
    if layout.quant is not None:
        module: LoRALinear = QuantLoRALinear(*args, mode=Mode.FROZEN, quantize=layout.quant)
    else:
        module = LoRALinear(*args, mode=Mode.FROZEN)
    module.adopt_layout(layout)
    if name is not None:
        module.target = TargetInfo.from_name(name)
    return module
