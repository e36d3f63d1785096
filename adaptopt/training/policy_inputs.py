"""What a policy reads: a :class:`~adaptopt.policies.LayerView` per layer, and the scores.

Policies never see a module (docs/design.md §7); the optimizer hands them these views and the
score table, whose weight-only families it refreshes here when a policy asks for them.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..policies import LayerView
from ..scores import FAMILY_KEYS, weight_scores


def layer_views(layers: Mapping[str, Any], lr_scales: Mapping[str, float]) -> dict[str, LayerView]:
    """What a policy sees of each layer: where it sits, its mode, rank, LR scale and shape."""
    views = {}
    for name, m in layers.items():
        t = m.target
        views[name] = LayerView(name, t.block_name if t else None, t.block_index if t else None,
                                t.layer_type if t else name, m.mode, m.rank, lr_scales[name],
                                m.in_features, m.out_features, m.layout().quant is not None)
    return views


def from_families(key: str, families: Iterable[str]) -> bool:
    """Does score ``key`` (e.g. ``"svd_raw"``, ``"signal_fraction_compat"``) belong to one of ``families``?"""
    return any(key in FAMILY_KEYS[f] for f in families)


def refresh_weight_scores(layers: Mapping[str, Any], scores: dict[str, dict[str, float]],
                          families: tuple[str, ...]) -> None:
    """Compute the weight-only score ``families`` of every layer into ``scores``, replacing that
    family's previous values (other scores are kept)."""
    if not families:
        return
    for name, values in weight_scores(layers, families).items():
        scores[name] = {k: v for k, v in scores[name].items() if not from_families(k, families)}
        scores[name].update(values)
