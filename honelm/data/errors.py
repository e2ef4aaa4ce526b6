"""Errors raised by the data pipeline, written for the person who has to fix the data."""

from __future__ import annotations


class DatasetFormatError(ValueError):
    """A dataset row (or the dataset as a whole) does not fit a supported format.

    Attributes:
        row: Index of the offending row, or ``None`` when the problem concerns the whole
            dataset (for example a missing column).
        column: Name of the offending column, or ``None`` when no single column is at fault.
    """

    def __init__(self, message: str, *, row: int | None = None, column: str | None = None) -> None:
        super().__init__(message)
        self.row = row
        self.column = column


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot do what the data needs.

    Raised when conversational data meets a tokenizer without a chat template, when
    assistant masks are requested from a template without ``{% generation %}`` markers,
    and when a template is not prefix-stable (rendering the prompt alone does not give a
    token prefix of rendering the whole conversation).

    Attributes:
        row: Index of the row being rendered, or ``None`` when the problem is found before
            any row is rendered.
    """

    def __init__(self, message: str, *, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row
