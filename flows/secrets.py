"""Storage secrets by reference: never a flow parameter, a log line or a catalog value.

Prefect stores every flow parameter in its database (and a server shows them in its UI), so storage
credentials never travel as parameters. A flow gets only the *public* storage options (endpoint,
region, ``AWS_ALLOW_HTTP``) and resolves the secret ones where it runs, from:

* the process environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``
  (what deltalake and s3fs read natively too). ``ctfactory run --storage-option
  AWS_SECRET_ACCESS_KEY=...`` moves such options into its own environment before any flow starts;
  Dask workers it starts inherit it; a served deployment uses the environment of ``ctfactory serve``.
* a Prefect ``Secret`` block named by the public option ``CTFACTORY_SECRET_BLOCK`` (or
  ``--storage-secret-block NAME``): its value is a JSON object of secret options, stored encrypted by
  Prefect. Only the block's name is a parameter.

Every secret value resolved here is also redacted (``***``) from log records of this process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Mapping

from factory.errors import FactoryError

SECRET_BLOCK_OPTION = "CTFACTORY_SECRET_BLOCK"
# The credential keys read from the environment (deltalake's and s3fs's own names for them).
ENV_SECRET_KEYS: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_KEY = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|ACCOUNT_KEY|SAS_KEY|"
                         r"SIGNATURE|API_KEY|^KEY$", re.IGNORECASE)
REDACTED = "***"
_MIN_REDACT_LEN = 4  # shorter values would blank out ordinary words

_redact_lock = threading.Lock()
_redact_values: set[str] = set()
_factory_installed = False


class SecretParameterError(FactoryError, ValueError):
    """Raised when a secret storage option would become a flow parameter."""


def is_secret_key(key: str) -> bool:
    """True for storage option keys that hold credentials (``AWS_SECRET_ACCESS_KEY``, ``*_TOKEN``, ...).

    ``CTFACTORY_SECRET_BLOCK`` holds the *name* of a block, a reference that may be a parameter.
    """
    return str(key) != SECRET_BLOCK_OPTION and bool(_SECRET_KEY.search(str(key)))


def split_storage_options(options: Mapping[str, str] | None) -> tuple[dict[str, str], dict[str, str]]:
    """Split options into ``(public, secret)`` by key name (see :func:`is_secret_key`)."""
    public, secret = {}, {}
    for key, value in (options or {}).items():
        (secret if is_secret_key(key) else public)[key] = value
    return public, secret


def refuse_secret_options(options: Mapping[str, str] | None, *, who: str) -> None:
    """Raise when ``options`` hold a secret: they are about to become parameters that Prefect stores.

    Raises:
        SecretParameterError: naming the key, never the value.
    """
    _, secret = split_storage_options(options)
    if secret:
        key = sorted(secret)[0]
        raise SecretParameterError(
            f"{who} expects storage options without credentials (Prefect stores parameters), but got "
            f"key={key!r}. Pass credentials by reference: set {key} in the environment of the process that "
            f"runs the flow, or save them in a Prefect Secret block and pass --storage-secret-block NAME."
        )


def export_secrets(secret: Mapping[str, str]) -> None:
    """Put secret options into this process's environment (inherited by the workers it starts) and redact them."""
    for key, value in secret.items():
        os.environ[key] = str(value)
    redact_values(secret.values())


def resolve_storage_options(options: Mapping[str, str] | None) -> dict[str, str] | None:
    """Return the storage options a library call needs: the public ones plus the secrets they refer to.

    Environment credentials are added when the options configure S3 (any ``AWS_*`` key); the block named
    by ``CTFACTORY_SECRET_BLOCK`` is loaded and merged. The result lives in memory only.
    """
    if not options:
        return None
    resolved = {k: v for k, v in options.items() if k != SECRET_BLOCK_OPTION}
    if any(str(k).upper().startswith("AWS_") for k in resolved):
        for key in ENV_SECRET_KEYS:
            if key in os.environ and key not in resolved:
                resolved[key] = os.environ[key]
    block = options.get(SECRET_BLOCK_OPTION)
    if block:
        resolved.update(load_secret_block(block))
    redact_values(v for k, v in resolved.items() if is_secret_key(k))
    return resolved or None


def load_secret_block(name: str) -> dict[str, str]:
    """Load a Prefect ``Secret`` block holding a JSON object of storage options.

    Raises:
        FactoryError: no such block, or its value is not a JSON object of strings.
    """
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as exc:
        raise FactoryError(f"resolve_storage_options expects a Prefect Secret block named {name!r}, but got none "
                         f"({' '.join(str(exc).split())[:160]}). Create it with prefect.blocks.system.Secret"
                         f"(value={{...}}).save({name!r}).") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FactoryError(f"resolve_storage_options expects Secret block {name!r} to hold a JSON object of "
                         f"KEY: VALUE strings, but got a value of type {type(value).__name__}. "
                         "Example: {\"AWS_SECRET_ACCESS_KEY\": \"...\"}.")
    redact_values(value.values())
    return {str(k): v for k, v in value.items()}


# -- redaction -----------------------------------------------------------------------------------


def redact_values(values) -> None:
    """Register secret values to be replaced by ``***`` in every later log record of this process."""
    fresh = {str(v) for v in values if v is not None and len(str(v)) >= _MIN_REDACT_LEN}
    if not fresh:
        return
    with _redact_lock:
        _redact_values.update(fresh)
    _install_record_factory()


def redact(text: str) -> str:
    """Return ``text`` with every registered secret value replaced by ``***``."""
    with _redact_lock:
        values = sorted(_redact_values, key=len, reverse=True)
    for value in values:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def _install_record_factory() -> None:
    """Wrap the log record factory once, so records of every logger (Prefect's API handler too) are redacted."""
    global _factory_installed
    with _redact_lock:
        if _factory_installed:
            return
        _factory_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's business, not ours
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return record

    logging.setLogRecordFactory(factory)
