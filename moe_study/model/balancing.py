"""Expert load balancing: the two auxiliary losses and DeepSeek-V3's aux-loss-free bias step.

Plain functions, apart from the Router that calls them, so a balancing scheme can be read, tested
and swapped on its own (the study compares routers, and these are where they differ). The fused
router (kernels/router.py) computes the same two losses inside its kernels; these are the
reference maths of the eager path, and CPU runs them byte for byte as before the split.
"""

from __future__ import annotations

import torch


def importance(scores: torch.Tensor, score: str) -> torch.Tensor:
    """P_i, the mean router probability of each expert over the T tokens, (E,), with its gradient.

    softmax: the probabilities themselves. sigmoid: the scores normalised per token first (DeepSeek-V3's
    normalised affinity), since independent sigmoids do not sum to 1 and would let P grow without bound.
    """
    if score == "softmax":
        return scores.mean(dim=0)
    return (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)


def load_fraction(counts: torch.Tensor) -> torch.Tensor:
    """f_i, the fraction of the T*k routed slots that went to each expert, from the (E,) float counts.

    A count has no gradient (as in Switch Transformer): the aux loss trains the router through P only.
    """
    return counts / counts.sum()


def load_balancing_loss(load: torch.Tensor, importance: torch.Tensor, experts: int) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_i f_i P_i: 1.0 when perfectly balanced, E when every slot
    goes to one expert. Minimising it pushes probability away from the experts that get the most slots."""
    return experts * (load * importance).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss mean_t logsumexp(logits_t)^2: keeps the logits small, so the softmax
    stays out of the range where bf16 rounding flips the top-k."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's aux-loss-free balancing, in place: bias += rate * sign(mean load - load), so an
    overloaded expert gets picked less and an idle one more, without a gradient that fights the LM loss.

    No host sync: with nothing routed every load is 0, so sign(mean - load) = 0 and the bias stays.
    """
    bias += rate * torch.sign(load.mean() - load)
