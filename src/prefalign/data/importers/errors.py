"""The outcomes of reading input that is not a clean row: reject a row, skip a row, reject a file, abort."""

from __future__ import annotations


class RowRejected(Exception):
    """One input row cannot be imported; it becomes one quarantine row.

    Args:
        category: Short, fixed name of the problem (``invalid label``), counted in the summary.
        detail: What exactly was wrong, with the offending values, for a person reading the quarantine.
    """

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail

    @property
    def reason(self) -> str:
        """The quarantine ``reason`` text: category, then detail."""
        return f"{self.category}: {self.detail}"


class RowSkipped(Exception):
    """A row that is deliberately not imported and is not an error (Pick-a-Pic's unlabeled rows).

    Skipped rows are counted in the summary but not quarantined: the quarantine holds what went wrong.
    """


class FileRejected(Exception):
    """A whole input file cannot be read (corrupt, empty, missing columns); one quarantine row, source_row -1."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail


class ImportAbortedError(ValueError):
    """Nothing could be imported at all: the input is missing or no file of it was readable, or the
    output folder's existing tables cannot be read. The message names the path; the CLI exits 2."""
