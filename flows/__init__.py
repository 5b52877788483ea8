"""Prefect flows: stage order, gates and promotion; no maths, no file formats. Run from the repo root."""
