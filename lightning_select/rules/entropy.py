"""EATA's sample filter and weights (Niu et al., ICML 2022): reliable, non-redundant, confidence-weighted.

A sample is *reliable* when its prediction entropy is below ``E0`` (``E0 = 0.4·ln C`` in the paper), and
*non-redundant* when the cosine similarity between its softmax output and a moving average of the
softmax outputs of past kept samples is below ``ε``. Kept samples are weighted by
``1/exp(E − E0) = exp(E0 − E)``, so more confident samples count more. These rules know nothing about
steps or ranks; :class:`~lightning_select.policies.entropy_selection.EntropySelection` wraps them.

Example::

    >>> import math, torch
    >>> logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> entropy = prediction_entropy(logits)
    >>> e0 = 0.4 * math.log(3)
    >>> reliable_mask(entropy, e0).tolist()
    [True, False]
    >>> eata_weights(entropy, e0)[0] > 1
    tensor(True)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def prediction_entropy(logits: Tensor) -> Tensor:
    """``[B]`` Shannon entropy (natural log) of ``softmax(logits)`` over the last dimension, in fp32.

    Example::

        >>> import math
        >>> abs(float(prediction_entropy(torch.zeros(1, 10))) - math.log(10)) < 1e-6
        True
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def reliable_mask(entropy: Tensor, threshold: float) -> Tensor:
    """``[B]`` bool: ``entropy < threshold`` (EATA's ``E0``; strict, as in the reference code).

    Example::

        >>> reliable_mask(torch.tensor([0.1, 0.5, 0.9]), 0.5).tolist()
        [True, False, False]
    """
    return entropy < threshold


def redundancy_mask(probs: Tensor, moving_average: Optional[Tensor], epsilon: float) -> Tensor:
    """``[B]`` bool keep-mask: ``|cos(probs_i, moving_average)| < epsilon``; all True when the average is None.

    ``probs`` are ``[B, C]`` softmax outputs and ``moving_average`` the ``[C]`` moving average of the
    softmax outputs of previously kept samples. Samples whose prediction points the same way as the
    recent average are redundant and dropped.

    Example::

        >>> probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
        >>> redundancy_mask(probs, torch.tensor([1.0, 0.0]), 0.5).tolist()
        [False, True, False]
        >>> redundancy_mask(probs, None, 0.5).tolist()
        [True, True, True]
    """
    if moving_average is None:
        return torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    average = moving_average.to(device=probs.device, dtype=probs.dtype).unsqueeze(0)
    return F.cosine_similarity(average, probs, dim=1).abs() < epsilon


def update_moving_average(average: Optional[Tensor], probs_of_kept: Tensor, momentum: float = 0.9) -> Optional[Tensor]:
    """EATA's update of the ``[C]`` moving average: ``m·average + (1 − m)·mean(probs_of_kept)``.

    The first call (``average`` None) initialises it to ``mean(probs_of_kept)``; with no kept rows the
    average is returned unchanged (None stays None).

    Example::

        >>> avg = update_moving_average(None, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> avg.tolist()
        [0.5, 0.5]
        >>> update_moving_average(avg, torch.tensor([[1.0, 0.0]]), momentum=0.5).tolist()
        [0.75, 0.25]
        >>> update_moving_average(avg, torch.zeros(0, 2)) is avg
        True
    """
    if probs_of_kept.shape[0] == 0:
        return average
    mean = probs_of_kept.float().mean(dim=0)
    if average is None:
        return mean
    return momentum * average.to(mean) + (1 - momentum) * mean


def eata_weights(entropy: Tensor, e0: float) -> Tensor:
    """``[B]`` EATA weights ``1/exp(E − E0) = exp(E0 − E)`` (above 1 for samples more confident than ``E0``).

    Example::

        >>> eata_weights(torch.tensor([1.0, 2.0]), 1.0).tolist()
        [1.0, 0.3678794503211975]
    """
    return torch.exp(e0 - entropy.float())
