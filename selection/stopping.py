"""The compute-proportional stopping rule of adaptive SIFT, shared by selection and training.

Stop before step n as soon as sigma_n > 1 / (alpha * n), where sigma_n = sqrt(sigma^2_{X_n}(x*)) is the
prompt's posterior standard deviation after n picks: the next step is only worth its compute while the
uncertainty it leaves shrinks at least as fast as 1/n.
"""

from __future__ import annotations

import torch


def stops_before(sigma_n: float | torch.Tensor, n: int, alpha: float) -> bool | torch.Tensor:
    """True (elementwise for tensors) where step n should not be taken."""
    return sigma_n > 1.0 / (alpha * n)
