"""How well any reward model can learn the demo world from its preference data: the perception ceiling.

The Bayes rate is the accuracy of the oracle itself, which knows both what to measure in an image and
how the six measurements combine into a score. A reward model has to learn both from noisy pairs. The
ceiling learner here is given the first for free: it sees the oracle's own measurements of every image
(``oracle.measure``: object colour, background, centroid, area, shape matches, cleanliness residual)
and the prompt's attributes, and learns the rest with Bradley–Terry on the same training pairs a reward
model gets. Its structure is the reward model's: an image encoder (an MLP on the measurements) and an
additive text encoder (a linear map of the attribute one-hots), score = their dot product; it is
selected on the validation BT loss, as ``train_reward`` is.

So it measures what the data allows a model with perfect perception: what is left between it and the
Bayes rate is the cost of learning the scoring function from the labels; what is left between a reward
model and it is the cost of learning to see. Demo world only (the oracle must exist).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from prefalign.evaluation.metrics import pairwise_accuracy
from prefalign.world.annotators import bayes_accuracy, expected_accuracy
from prefalign.world.grammar import DOMAINS, parse_prompt
from prefalign.world.oracle import measure, oracle_scores

EVAL_EVERY = 250


@dataclass(frozen=True)
class CeilingResult:
    """Held-out figures of the ceiling learner, on the decided test pairs.

    Attributes:
        expected_accuracy: accuracy averaged over annotator draws (``annotators.expected_accuracy``).
        pairwise_accuracy: accuracy on the test labels as drawn.
        oracle_agreement: share of pairs ordered as the oracle orders them.
        bayes_accuracy: the oracle's own expected accuracy on the same pairs.
        best_step: the step whose weights had the lowest validation BT loss.
    """

    expected_accuracy: float
    pairwise_accuracy: float | None  # None when the test split has no decided pair
    oracle_agreement: float
    bayes_accuracy: float
    best_step: int


def oracle_metrics(data, score_w: np.ndarray, score_l: np.ndarray, *, tau: float) -> dict[str, float]:
    """What the demo world's known truth says of a model's scores on the decided pairs of ``data``.

    Args:
        data: a ``RewardData`` split of the demo world.
        score_w, score_l: the model's scores of every pair's two images (ties included; they are skipped).
        tau: the annotators' Bradley–Terry temperature.

    Returns:
        ``bayes_accuracy``: the oracle's own expected accuracy, mean of sigma(|delta| / tau).
        ``expected_accuracy``: the model's accuracy averaged over annotator draws on the same pairs (the same
        quantity for the model, so the gap to the Bayes rate carries no label-sampling error).
        ``oracle_agreement``: share of pairs the model orders as the oracle does.
    """
    decided = data.pair_label == 1.0
    prompts = [data.prompts[i] for i in data.pair_prompt[decided]]
    oracle_w = oracle_scores(prompts, data.images[data.pair_w[decided]])
    oracle_l = oracle_scores(prompts, data.images[data.pair_l[decided]])
    model_w, model_l = score_w[decided], score_l[decided]
    return {
        "bayes_accuracy": float(bayes_accuracy(oracle_w, oracle_l, tau=tau)),
        "expected_accuracy": float(expected_accuracy(model_w, model_l, oracle_w, oracle_l, tau=tau)),
        "oracle_agreement": float(np.mean(np.sign(model_w - model_l) == np.sign(oracle_w - oracle_l))),
    }


def image_features(images: np.ndarray) -> np.ndarray:
    """float32 ``(N, 14)``: the oracle's measurements of uint8 ``(N, S, S, 3)`` images, scaled to about [0, 1]."""
    m = measure(images)
    return np.concatenate(
        [
            m.found[:, None],
            m.background / 255.0,
            m.color / 255.0,
            m.centroid,
            np.log1p(m.area)[:, None] / 5.0,
            m.shape_match,
            m.residual[:, None] / 50.0,
        ],
        axis=1,
    ).astype(np.float32)


def prompt_features(prompts: list[str]) -> np.ndarray:
    """float32 ``(P, 19)``: one-hot of each attribute of each grammar prompt."""
    rows = []
    for prompt in prompts:
        attributes = parse_prompt(prompt)
        rows.append(
            np.concatenate(
                [np.eye(len(values))[values.index(getattr(attributes, name))] for name, values in DOMAINS.items()]
            )
        )
    return np.asarray(rows, dtype=np.float32)


class _CeilingModel(torch.nn.Module):
    def __init__(self, image_dim: int, prompt_dim: int, *, width: int, embed_dim: int) -> None:
        super().__init__()
        self.image = torch.nn.Sequential(
            torch.nn.Linear(image_dim, width),
            torch.nn.GELU(),
            torch.nn.Linear(width, width),
            torch.nn.GELU(),
            torch.nn.Linear(width, embed_dim),
        )
        self.text = torch.nn.Linear(prompt_dim, embed_dim)

    def forward(self, image_features: torch.Tensor, prompt_features: torch.Tensor) -> torch.Tensor:
        return (self.image(image_features) * self.text(prompt_features)).sum(-1)


class _Split:
    """A ``RewardData`` split as feature tensors and decided-pair index arrays."""

    def __init__(self, data) -> None:
        self.images = torch.from_numpy(image_features(data.images))
        self.prompts = torch.from_numpy(prompt_features(list(data.prompts)))
        self.prompt, self.w, self.l = (torch.from_numpy(a) for a in (data.pair_prompt, data.pair_w, data.pair_l))
        self.label = torch.from_numpy(data.pair_label.astype(np.float32))

    def gaps(self, model: _CeilingModel, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        text = self.prompts[self.prompt[rows]]
        return model(self.images[self.w[rows]], text) - model(self.images[self.l[rows]], text)

    def loss(self, model: _CeilingModel, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        gap, label = self.gaps(model, rows), self.label[rows]
        return -(label * F.logsigmoid(gap) + (1 - label) * F.logsigmoid(-gap)).mean()


def perception_ceiling(
    train,
    val,
    test,
    *,
    tau: float,
    seed: int = 0,
    steps: int = 4000,
    batch_size: int = 256,
    lr: float = 1e-3,
    width: int = 256,
    embed_dim: int = 64,
) -> CeilingResult:
    """Train the ceiling learner on ``train`` pairs, select on ``val`` BT loss, score the ``test`` pairs.

    Args:
        train, val, test: ``prefalign.training.reward.RewardData`` splits of the demo world.
        tau: the annotators' Bradley–Terry temperature (for the expected accuracies).
        seed: initialisation and batch order.
        steps, batch_size, lr, width, embed_dim: AdamW steps of ``batch_size`` pairs; MLP width; embedding width.
            The defaults were the best of a small sweep (wider, deeper, dropout, weight decay 0.1, lower lr
            with twice the steps, batch 1024: none better by more than the seed-to-seed spread).

    Returns:
        The ``CeilingResult`` of the kept weights.

    Raises:
        ValueError: ``train`` has no pairs, or ``test`` no decided pairs.
    """
    if train.n_pairs == 0:
        raise ValueError("the ceiling learner needs training pairs; the train split has none")
    if not (test.pair_label == 1.0).any():
        raise ValueError("the test split has no decided pairs to score")
    splits = {name: _Split(data) for name, data in (("train", train), ("val", val), ("test", test))}
    torch.manual_seed(seed)
    model = _CeilingModel(
        splits["train"].images.shape[1], splits["train"].prompts.shape[1], width=width, embed_dim=embed_dim
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    rng = np.random.default_rng(seed)
    best_loss, best_step, best_state = np.inf, 0, None
    for step in range(1, steps + 1):
        rows = torch.from_numpy(rng.integers(0, train.n_pairs, batch_size))
        loss = splits["train"].loss(model, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % EVAL_EVERY == 0 or step == steps:
            with torch.no_grad():
                val_loss = float(splits["val"].loss(model)) if val.n_pairs else -step  # no val: keep the last
            if val_loss < best_loss:
                best_loss, best_step = val_loss, step
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert best_state is not None, "the first evaluation always keeps a state"
    model.load_state_dict(best_state)
    with torch.no_grad():
        gap = splits["test"].gaps(model).numpy()
    zeros = np.zeros_like(gap)
    accuracy = pairwise_accuracy(gap, zeros, test.pair_label)[0]
    return CeilingResult(pairwise_accuracy=accuracy, best_step=best_step, **oracle_metrics(test, gap, zeros, tau=tau))
