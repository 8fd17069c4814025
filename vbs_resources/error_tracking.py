"""Error tracking with Sentry (``sentry-sdk``) when ``VBS_SENTRY_DSN`` is set.

``start_error_tracking(settings, component)`` is called where each process starts: the API
server, and the code location (its code server, the daemon's sensors and every run worker load
it). Errors and error-level log lines become Sentry events, tagged with the component.

No secret leaves in an event: besides Sentry's own scrubbing by field name (``password``,
``authorization``, ...), every string of an event is searched for the values of vbs's secret
settings (API keys, the webhook secret, tokens, the database URLs and their passwords) and each
is replaced by ``[Filtered]``, wherever it sits: a message, an exception's text, a local
variable, a breadcrumb. Personal data (client IPs, request bodies, cookies) is not sent.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from vbs_resources.settings import Settings

FILTERED = "[Filtered]"
# Shorter values are not searched for: they would match ordinary text.
MIN_SECRET_LENGTH = 6


def secret_values(settings: Settings) -> list[str]:
    """The values to keep out of events, longest first (a URL before its password)."""
    found: set[str] = set()
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, SecretStr):
                secret = item.get_secret_value()
                found.add(secret)
                password = _password(secret)
                if password:
                    found.add(password)
    return sorted((s for s in found if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def _password(value: str) -> str | None:
    try:
        return urlsplit(value).password if "://" in value else None
    except ValueError:
        return None


def scrub(value: Any, secrets: list[str]) -> Any:
    """``value`` (an event, or any part of one) with every secret replaced, in place for dicts
    and lists."""
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, FILTERED)
        return value
    if isinstance(value, dict):
        for key in list(value):
            value[key] = scrub(value[key], secrets)
        return value
    if isinstance(value, list):
        for index, item in enumerate(value):
            value[index] = scrub(item, secrets)
        return value
    return value


def start_error_tracking(settings: Settings, component: str) -> bool:
    """Start Sentry in this process when ``VBS_SENTRY_DSN`` is set; True if it started."""
    if settings.sentry_dsn is None:
        return False
    import sentry_sdk

    from vbs_resources.version import version

    secrets = secret_values(settings)

    def before_send(event: dict[str, Any], _hint: dict[str, Any]) -> dict[str, Any]:
        return scrub(event, secrets)

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.sentry_environment,
        release=f"vbs@{version()}",
        send_default_pii=False,
        traces_sample_rate=0,
        before_send=before_send,
        before_breadcrumb=lambda crumb, _hint: scrub(crumb, secrets),
    )
    sentry_sdk.set_tag("component", component)
    return True
