"""The project's random-number contract: every random draw of training is seeded by integer
keys (seed, step, stream), so a draw does not depend on the world size, on the device count,
or on whether the run was restarted before it. A stream names what the draw is for; two uses
of one (seed, step) never share a stream.
"""

from __future__ import annotations

import numpy as np

STEP_DRAWS_STREAM = 1  # a training step's timesteps, noise and label-dropout mask (train.loop.draw_step)
PCGRAD_ORDER_STREAM = 2  # PCGrad's projection orders of a step (train.mtl)


def step_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (seed, step, stream, ...), stable across runs and platforms
    (numpy's SeedSequence hashes the keys)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))
