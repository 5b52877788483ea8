"""Canonical preference data: table schemas and the image store, preparation helpers, the GX gate.

- ``schema``: pyarrow schemas of ``pairs`` / ``rankings`` / ``feedback`` / ``quarantine``, atomic parquet
  I/O and the content-addressed ``ImageStore``.
- ``prepare``: pair ids, prompt-hash splits, ties and de-duplication.
- ``validation``: the Great Expectations suite (GX is imported lazily, inside its functions only).

Importing this package imports nothing heavy.
"""
