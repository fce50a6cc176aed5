"""The QuantPlanError hierarchy: errors a user caused and can fix, with a message that says how."""

from __future__ import annotations


class QuantPlanError(Exception):
    """Bad input or an unusable environment; the message says what was wrong and what to do.

    The command line prints it on one line and exits non-zero, without a traceback.
    """


class SchemeError(QuantPlanError, ValueError):
    """A weight, activation or layer scheme name that does not parse or is not supported."""


class PlanError(QuantPlanError, ValueError):
    """A malformed plan file or a plan that does not fit the model it is applied to."""


class ModelLoadError(QuantPlanError):
    """A model that cannot be found or loaded (missing directory, unreachable hub, bad checkpoint)."""


class DataError(QuantPlanError):
    """A data spec that does not parse, points at missing files, or yields too few tokens."""


class SettingsError(QuantPlanError, ValueError):
    """A setting (keyword, `QUANTPLAN_*` environment variable or config file entry) that does not parse."""


class ArtifactError(QuantPlanError):
    """A materialized artifact that is missing, corrupted, of an unknown format, or made for another base model."""
