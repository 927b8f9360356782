"""User-facing errors: one paragraph naming what is wrong and what to do; the CLI prints them without a traceback."""

from __future__ import annotations


class SlimcError(Exception):
    """Base class for every error slimc reports to a user (bad model, bad option, bad file)."""

    exit_code = 2


class FrontendError(SlimcError):
    """A model could not be imported: unknown op, malformed file, unsupported construct."""


class IRError(SlimcError):
    """A graph violates the IR's invariants (SSA, types, per-op rules) or its text does not parse."""


class PipelineError(SlimcError):
    """A pass pipeline is malformed, names an unknown pass/option, or a pass failed."""


class ShapeError(SlimcError):
    """An input shape does not fit the model."""
