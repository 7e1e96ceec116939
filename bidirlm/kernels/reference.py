"""Plain-torch references of every op: the CPU path and the ground truth of the tests.

Each reference computes in the dtype it is given (tests call it in float64) and follows the public
contract in DESIGN.md exactly, including the documented differences from torch (e.g. a `mean` over
zero labelled rows is 0.0, not NaN).
"""

from __future__ import annotations

import torch  # noqa: F401  (used by the op sections below)
