"""The three things a target layer can do while training runs.

Every pair of modes is an allowed transition, and every transition is
function-preserving (see :meth:`adaptopt.LoRALinear.set_mode`), so the state machine
has no forbidden edges: what a policy may do is limited only by what it wants.
"""
from __future__ import annotations

from enum import Enum


class Mode(str, Enum):
    """Trainable state of one target layer.

    - ``FROZEN``: nothing in the layer trains.
    - ``LORA``: the base weight is frozen; a rank-``r`` adapter ``s·BA`` trains.
    - ``FULL``: the layer's weight (and bias) train directly.

    A ``str`` enum, so ``Mode("lora")`` and ``Mode.LORA == "lora"`` both work, which keeps
    YAML configs and JSON checkpoints readable.
    """

    FROZEN = "frozen"
    LORA = "lora"
    FULL = "full"

    @classmethod
    def coerce(cls, value: "Mode | str") -> "Mode":
        """``value`` as a :class:`Mode`, accepting any letter case; a clear error otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        allowed = ", ".join(repr(m.value) for m in cls)
        raise ValueError(f"unknown mode {value!r}: use one of {allowed} (or adaptopt.Mode.*)")

    def __str__(self) -> str:  # "lora", not "Mode.LORA", in tables and logs
        return self.value
