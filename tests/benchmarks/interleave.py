"""The benchmarks' timing discipline: within every repeat the candidates run in turn (so the
machine's drift hits them all alike), and each is summarised by its median over the repeats."""
from __future__ import annotations

import math
import statistics
from typing import Callable, Mapping


def interleaved_medians(measures: Mapping[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of ``repeats`` calls to each measure, the measures called in turn within every
    repeat (``nan`` for each when ``repeats`` is 0)."""
    times: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            times[name].append(measure())
    return {name: statistics.median(t) if t else math.nan for name, t in times.items()}
