"""Evaluation: win rates and bootstrap intervals (``metrics``), figures (``figures``, matplotlib imported
lazily), generation on fixed seeds (``generate``) and the report (``report``).

Only the numpy-only metrics are exported here, so importing the package stays cheap (no torch, no matplotlib).
"""

from prefalign.evaluation.metrics import beats, mean_ci, win_rate

__all__ = ["beats", "mean_ci", "win_rate"]
