"""Reward-model losses on scalar scores: Bradley–Terry on pairs, Plackett–Luce on ranked lists.

Conventions shared by every function here (docs/design.md, "Loss contract"):

* A score s = r_φ(prompt, image) is the reward model's scalar output; higher means more preferred.
  For the CLIP-style scorer, s = exp(logit_scale) · cos(text, image).
* Inputs are per-sample: ``(B,)`` for pairs, ``(B, K)`` for rankings. Outputs are the per-sample loss
  ``(B,)``; callers average (and weight) them.
* Everything goes through ``logsigmoid`` / ``logsumexp`` so that large score gaps neither overflow nor
  lose precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    score_w: Tensor, score_l: Tensor, *, margin: float = 0.0, label: float | Tensor | None = None
) -> Tensor:
    """Bradley–Terry negative log-likelihood of a pairwise judgement (Bradley & Terry 1952).

    Model: P(w ≻ l) = σ(s_w − s_l). With Δ = s_w − s_l:

    * a decided pair (``label`` None or 1.0): −log σ(Δ − m), where m = ``margin`` asks the winner to lead
      by at least m (the margin form of Llama-2 / TRL's reward trainer; m = 0 is plain BT);
    * a tie (``label`` 0.5): the soft-label cross-entropy −½ log σ(Δ) − ½ log σ(−Δ), minimal at Δ = 0.
      This is the two-image softmax with targets (½, ½) that PickScore trains on (Kirstain et al. 2023,
      arXiv 2305.01569, Sec. 3), without its constant log ½ offset, so a perfect tie costs log 2 here.
      The margin does not apply to ties: a tie asks for equal scores, not for a lead.

    Any other label p ∈ [0, 1] is read the same way, as the soft target −p log σ(Δ) − (1−p) log σ(−Δ).

    Args:
        score_w: `(B,)` scores s_w of the preferred image (for a tie: the first image in source order).
        score_l: `(B,)` scores s_l of the other image.
        margin: m ≥ 0, the lead required of decided pairs (in score units).
        label: None (all pairs decided), a float for the whole batch, or a `(B,)` tensor mixing 1.0 and 0.5.

    Returns:
        `(B,)` per-pair loss.
    """
    delta = score_w - score_l
    decided = -F.logsigmoid(delta - margin)
    if label is None:
        return decided
    target = torch.as_tensor(label, dtype=delta.dtype, device=delta.device).expand_as(delta)
    if bool(((target < 0) | (target > 1)).any()):
        raise ValueError(f"labels must lie in [0, 1] (1.0 = w preferred, 0.5 = tie), got {label}")
    soft = -target * F.logsigmoid(delta) - (1.0 - target) * F.logsigmoid(-delta)
    return torch.where(target == 1.0, decided, soft)


def plackett_luce_loss(scores: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Plackett–Luce negative log-likelihood of a ranking (Plackett 1975; Luce 1959).

    Model: the ranking π = (1, …, K) (best first) is drawn by picking the best item, then the best of the
    rest, and so on, each pick with softmax probabilities over the items still left:

        P(π) = ∏_{k=1..K} exp(s_k) / Σ_{j=k..K} exp(s_j),   loss = −Σ_k [s_k − log Σ_{j≥k} exp(s_j)].

    The last valid position always contributes 0 (it is the only item left). For K = 2 this is exactly
    the Bradley–Terry loss −log σ(s_1 − s_2).

    Ragged rankings: entries with ``mask`` False are left out of every softmax and contribute nothing, so
    a padded row equals the shorter ranking of its valid entries (padding goes at the end by convention;
    the order of the valid entries is what counts).

    Args:
        scores: `(B, K)` scores, column 0 the best-ranked item.
        mask: optional `(B, K)` bool, True where the entry is a real item.

    Returns:
        `(B,)` per-ranking loss, summed over positions.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    masked = scores.masked_fill(~mask, float("-inf"))
    # log Σ_{j≥k} exp(s_j) for every k at once: a cumulative logsumexp run from the end of each row.
    # −inf entries add exp(−inf) = 0 to every sum, so padding never enters a valid position's softmax.
    tail_logsumexp = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    log_pick = torch.where(mask, masked - tail_logsumexp, torch.zeros_like(scores))
    return -log_pick.sum(dim=-1)


def clip_contrastive_loss(logits: Tensor, same_caption: Tensor | None = None) -> Tensor:
    """CLIP's symmetric contrastive loss over a batch of N (image, caption) pairs (Radford et al. 2021,
    arXiv 2103.00020, Fig. 3), with several positives per row where captions repeat.

    With logits L_ij = t · cos(image_i, caption_j) and targets q_ij = [c_i = c_j] / Σ_k [c_i = c_k]
    (uniform over the captions identical to row i's; the identity matrix when all captions differ):

        loss_i = ½ (−Σ_j q_ij log softmax_j(L_i·) − Σ_j q_ji log softmax_j(L_·i)),

    the image-to-text and text-to-image cross-entropies. Counting a repeated caption as a negative would
    push apart pairs that say exactly the same thing; the demo world's 540 prompts repeat within a batch.

    Args:
        logits: `(N, N)` image-by-caption logits, row i the i-th image, column j the j-th caption.
        same_caption: optional `(N, N)` bool, True where captions i and j are identical; the diagonal
            must be True. None means all captions differ.

    Returns:
        `(N,)` per-pair loss.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be square (N, N), got shape {tuple(logits.shape)}")
    if same_caption is None:
        same_caption = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    if not bool(same_caption.diagonal().all()):
        raise ValueError("same_caption must be True on its diagonal (every caption equals itself)")
    target = same_caption.to(logits.dtype)
    target = target / target.sum(dim=1, keepdim=True)  # symmetric matrix: rows and columns sum alike
    image_to_text = -(target * logits.log_softmax(dim=1)).sum(dim=1)
    text_to_image = -(target * logits.log_softmax(dim=0)).sum(dim=0)
    return 0.5 * (image_to_text + text_to_image)


REWARD_LOSSES: dict[str, Callable[..., Tensor]] = {
    "bt": bradley_terry_loss,
    "pl": plackett_luce_loss,
}
"""Reward losses by the config's ``RewardLoss`` name ("mixed" is the mean of both, composed by the loop)."""
