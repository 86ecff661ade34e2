"""Errors of the API layer: a manifest that does not describe a valid object."""

from __future__ import annotations


class ApiError(Exception):
    """Base of every error `partita.api` raises."""


class ManifestError(ApiError):
    """A manifest is not a valid DevicePool or EdgeModel; the message names the field."""
