"""Static twins: the :class:`~adaptopt.Scheduled` plan that repeats what an adaptive run reached —
every layer's final mode from step 0, late freezes at their steps — and the method config that runs
it (docs/cli.md, "The task suite"). The suite runs twins with it; a run's FLOPs are priced by it
(:mod:`adaptopt.cli.run_flops`).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence


def static_twin(decisions: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """The :class:`~adaptopt.Scheduled` plan of a run's static twin, from its ``decisions.json``:
    every layer from step 0 in the mode it trained in at the last step — or, for a layer frozen late
    (trained, then frozen for good), in the mode it had before, frozen at the same step. The output
    adapter, which no policy decides, is not in the plan (:func:`twin_method` keeps it)."""
    layers, steps = decisions["layers"], decisions["timeline"]
    plan: dict[str, dict[str, str]] = {"0": {}}
    for i, name in enumerate(layers):
        if name == decisions.get("output_adapter"):
            continue
        modes = [s["modes"][i] for s in steps]
        final = modes[-1]
        if final == "frozen" and any(m != "frozen" for m in modes):
            last_trained = max(k for k, m in enumerate(modes) if m != "frozen")
            plan["0"][name] = modes[last_trained]
            # the timeline records each step as it begins (1-based); the plan decides after completed steps
            plan.setdefault(str(steps[last_trained + 1]["step"] - 1), {})[name] = "frozen"
        else:
            plan["0"][name] = final
    return plan


def twin_method(method: Mapping[str, Any], plan: Mapping[str, Any], output_adapter: bool = False,
                policy_extra: Sequence[str] = ()) -> dict[str, Any]:
    """The method config that runs ``plan`` with ``method``'s learning rates, LoRA settings and
    trained extras (``train_embeddings``, ``trainable``), and what its policy trained besides the
    layers it decided: the output adapter (``output_adapter``) and the policy's own trainable
    patterns (``policy_extra``, e.g. Hybrid's ``head_inputs``); not its budget (the plan already kept to it)."""
    twin = {k: copy.deepcopy(v) for k, v in method.items() if k in ("lr", "lora_lr", "lora", "train_other",
                                                                        "trainable", "train_embeddings")}
    if output_adapter:
        twin["train_embeddings"] = "output_lora"
    if policy_extra:
        twin["trainable"] = list(dict.fromkeys([*(twin.get("trainable") or ()), *policy_extra]))
    return {**twin, "method": "scheduled", "scheduled": {"plan": dict(plan)}, "label": f"{method['label']} twin"}
