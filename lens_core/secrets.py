"""Credentials never reach a public page, a log, a status file or a Prefect parameter.

The site is public by design, so anything that reaches it is published. Three rules:
- what is stored or published of the storage options is an allow-list (`public_options`);
  every other value is masked;
- URLs never carry credentials (`check_url_secrets`: no `user:password@`, no signature or
  credential query parameters);
- every error text that leaves the process (status files, logs, the site's failed-class box,
  the flow's artifacts) goes through `scrub`.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

MASK = "***"
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")

# storage options that may be stored in run.json and shown on the method page (dotted paths)
PUBLIC_STORAGE_OPTIONS = frozenset({
    "endpoint_url", "region_name", "anon", "use_ssl", "requester_pays", "version_aware",
    "default_block_size", "default_fill_cache", "default_cache_type", "cache_regions",
    "skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_concurrency",
    "asynchronous", "client_kwargs.region_name", "client_kwargs.endpoint_url", "client_kwargs.verify",
    "config_kwargs.signature_version", "config_kwargs.connect_timeout", "config_kwargs.read_timeout",
    "config_kwargs.retries", "config_kwargs.s3", "config_kwargs.max_pool_connections",
})

# option names that hold a credential (matched on the last path segment, case-insensitive)
SECRET_KEY_RE = re.compile(
    r"(^|[_.-])(key|secret|token|password|passwd|pwd|credentials?|authorization|auth|cookie|"
    r"connection_?string|sas|signature|private|session)([_.-]|$)|access_?key|account_?key|api_?key|secret",
    re.IGNORECASE,
)
# query parameters of signed or credentialed URLs (S3 presigned, Azure SAS, GCS signed, tokens)
SECRET_QUERY_RE = re.compile(
    r"^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|signature|sig|"
    r"awsaccesskeyid|access_?token|token|key|api_?key|password|secret)$",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s?#]+)@")
_TEXT_PATTERNS = (
    (re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + MASK),
    (re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|SharedAccessKey|Password|Pwd|"
                r"aws_secret_access_key|aws_session_token|secret_?key)\s*[=:]\s*[^;&\s'\",}]+"), r"\1=" + MASK),
    (re.compile(r"(?i)([?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|"
                r"X-Goog-Credential|Signature|sig|AWSAccessKeyId|access_token|token)=)[^&\s'\"]+"), r"\1" + MASK),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL), MASK),
)


class SecretError(ValueError):
    """A value would carry a credential where it would be stored or published."""


def is_secret_key(name: str) -> bool:
    """True for option names that hold credentials (key, secret, token, Authorization, ...)."""
    return bool(SECRET_KEY_RE.search(str(name)))


def url_secret(url: str) -> str | None:
    """Why a URL carries a credential (userinfo, a signature or credential query), or None."""
    if not isinstance(url, str) or "://" not in url and "?" not in url:
        return None
    if _URL_USERINFO.search(url):
        return "a user:password@ part"
    try:
        query = urlsplit(url).query
    except ValueError:
        return None
    names = sorted({k for k, _ in parse_qsl(query, keep_blank_values=True) if SECRET_QUERY_RE.match(k)})
    if names:
        return f"signature or credential query parameters ({', '.join(names)})"
    return None


def check_url_secrets(url: str) -> str:
    """The URL, or SecretError when it carries credentials (they would be logged and published)."""
    why = url_secret(url)
    if why:
        raise SecretError(f"URLs with {why} are refused (the URL would be logged and published): "
                          "use storage_options or environment variables for credentials")
    return url


def value_secret(value: Any) -> str | None:
    """Why a string value looks like a credential (a bearer token, a key=..., a signed URL), or None."""
    if not isinstance(value, str):
        return None
    why = url_secret(value)
    if why:
        return why
    for pattern, _ in _TEXT_PATTERNS:
        if pattern.search(value):
            return "a credential in the text"
    return None


def find_secrets(obj: Any, path: str = "") -> list[str]:
    """Dotted paths in a nested dict/list whose key names a credential or whose value carries one."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            if is_secret_key(k) and v not in (None, "", {}, []):
                found.append(sub)
            else:
                found += find_secrets(v, sub)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            found += find_secrets(v, f"{path}[{i}]")
    elif value_secret(obj):
        found.append(path or "(value)")
    return found


def mask_secrets(obj: Any) -> Any:
    """A copy of nested data with credential-named values and credential-bearing strings masked."""
    if isinstance(obj, dict):
        return {k: (MASK if is_secret_key(k) and v not in (None, "") else mask_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [mask_secrets(v) for v in obj]
    return MASK if value_secret(obj) else obj


def public_options(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Storage options as they may be stored and published: allow-listed values, everything else masked."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and not is_secret_key(k):
            out[k] = public_options(v, path + ".")
        elif path in PUBLIC_STORAGE_OPTIONS and not find_secrets(v):
            out[k] = v
        else:
            out[k] = MASK
    return out


def _known_values(storage_options: dict[str, Any] | None) -> list[str]:
    values = [os.environ.get(k, "") for k in SECRET_ENV]

    def walk(opts: Any, secret: bool = False) -> None:
        if isinstance(opts, dict):
            for k, v in opts.items():
                walk(v, secret or is_secret_key(k))
        elif isinstance(opts, list | tuple):
            for v in opts:
                walk(v, secret)
        elif isinstance(opts, str) and secret:
            values.append(opts)

    walk(storage_options or {})
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def scrub(text: str, storage_options: dict[str, Any] | None = None) -> str:
    """`text` with every credential we know of masked: option and AWS_* environment values, URL
    userinfo, signature/credential query parameters, bearer tokens, key=value secrets, private keys."""
    text = str(text)
    for value in _known_values(storage_options):
        text = text.replace(value, MASK)
    text = _URL_USERINFO.sub(r"\1" + MASK + "@", text)
    for pattern, repl in _TEXT_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def error_text(err: BaseException, storage_options: dict[str, Any] | None = None, limit: int = 2000) -> str:
    """One line per error for status files, logs and the site: `Type: message`, scrubbed, bounded."""
    return scrub(f"{type(err).__name__}: {err}", storage_options)[:limit]
