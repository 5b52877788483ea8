"""Prefect tasks: each is one call into ``prefalign`` (or one subprocess). Run from the repo root."""
