"""Exceptions of the Prefect wiring (serving and submitting deployments); the rest are in :mod:`factory.errors`."""

from __future__ import annotations

from factory.errors import FactoryError


class DeploymentError(FactoryError, RuntimeError):
    """Raised when serving or submitting a deployment fails (no server, unknown deployment)."""


class ConcurrencyLimitError(FactoryError, ValueError):
    """Raised when ``runtime.concurrency_limit`` names a limit the Prefect API does not have."""


class DaskClusterError(FactoryError, ConnectionError):
    """Raised when ``runtime.dask_address`` names a Dask scheduler that does not answer."""
