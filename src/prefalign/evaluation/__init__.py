"""Evaluation: win rates and bootstrap intervals (``metrics``), figures (``figures``, matplotlib imported
lazily) and the report (``report``); the sampler is ``prefalign.models.sampling``.

Nothing is re-exported, so importing one module runs that module only (see ``prefalign.world``).
"""
