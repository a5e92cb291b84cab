"""The one learning-rate schedule: cosine annealing, a function of the step alone.

A closed form (not a scheduler object with its own state) so a resumed run needs only
its step count to set the rate, and every stage anneals the same way.
"""

from __future__ import annotations

import math


def cosine(base: float, step: int, total: int, floor: float = 0.0) -> float:
    """``base`` at step 0 down to ``floor`` at step ``total`` along half a cosine."""
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * step / max(total, 1)))
