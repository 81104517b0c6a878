"""Credentials never reach a log line: Redis URLs lose their password, request targets lose secret-looking query
parameters (``?api_key=...``), and :class:`RedactSecrets` applies both to every record it filters (the CLI puts it
on uvicorn's access and error handlers and on the root handler)."""

from __future__ import annotations

import logging
import re

REDACTED = "***"

# Query parameter names that carry credentials (compared lower-case, '-' read as '_').
_SECRET_PARAMETER = re.compile(
    r"^(api_?key|apikey|x_api_key|key|token|access_token|refresh_token|id_token|auth|authorization|"
    r"secret|client_secret|password|passwd|pwd|signature|sig|session|sessionid)$"
)
# scheme://user:password@host: the userinfo part of any URL inside free text.
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]*)@")
# name=value pairs inside free text (a URL or a request target written into a message).
_PARAMETER = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def is_secret_parameter(name: str) -> bool:
    return bool(_SECRET_PARAMETER.match(name.lower().replace("-", "_")))


def redact_url(url: str) -> str:
    """``redis://:pw@host:6379/0?password=pw`` → ``redis://:***@host:6379/0?password=***`` (a user name stays)."""
    return redact_text(url)


def redact_text(text: str) -> str:
    """Redact every URL password and secret-looking ``name=value`` query parameter inside free text."""

    def userinfo(match: re.Match[str]) -> str:
        info = match["userinfo"]
        user = info.split(":", 1)[0] if ":" in info else ""
        return f"{match['scheme']}{user}:{REDACTED}@"

    def parameter(match: re.Match[str]) -> str:
        if is_secret_parameter(match["name"]):
            return f"{match['lead']}{match['name']}={REDACTED}"
        return match.group(0)

    return _PARAMETER.sub(parameter, _USERINFO.sub(userinfo, text))


class RedactSecrets(logging.Filter):
    """Rewrites a record's message arguments (and its message, when it has none) through :func:`redact_text`.

    uvicorn's access log passes the request target as an argument (``'%s - "%s %s HTTP/%s" %d'``), so the query
    string of ``GET /v1/items?api_key=...`` is redacted before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact_text(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact_text(v) if isinstance(v, str) else v for k, v in record.args.items()}
        elif isinstance(
            record.msg, str
        ):  # no arguments: the message is the text (a format string is left alone)
            record.msg = redact_text(record.msg)
        return True
