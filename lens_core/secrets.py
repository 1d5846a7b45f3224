"""Credentials never reach a public page, a log, a status file or a Prefect parameter.

The site is public by design, so anything that reaches it is published. Three rules:
- what is stored or published of the storage options is an allow-list (`public_options`);
  every other value is masked;
- URLs never carry credentials (`check_url_secrets`): no `user:password@`, and a query only
  when every parameter is on `PUBLIC_QUERY_PARAMS` (an allow-list, like the options: a deny-list
  of credential names missed `sas_token`, `client_secret`, `code`, `sig[]`, ...). Such a URL is
  refused, not published with its query removed: it would already be a Prefect parameter, a
  log line and part of the run's identity before anything could strip it;
- every error text that leaves the process (status files, logs, the site's failed-class box,
  the flow's artifacts) goes through `scrub`.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any
from urllib.parse import unquote, unquote_plus

MASK = "***"
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")

# storage options that may be stored in run.json and shown on the method page (dotted paths)
PUBLIC_STORAGE_OPTIONS = frozenset(
    {
        "endpoint_url",
        "region_name",
        "anon",
        "use_ssl",
        "requester_pays",
        "version_aware",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "cache_regions",
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_concurrency",
        "asynchronous",
        "client_kwargs.region_name",
        "client_kwargs.endpoint_url",
        "client_kwargs.verify",
        "config_kwargs.signature_version",
        "config_kwargs.connect_timeout",
        "config_kwargs.read_timeout",
        "config_kwargs.retries",
        "config_kwargs.s3",
        "config_kwargs.max_pool_connections",
    }
)

# option names that hold a credential (matched anywhere in the last path segment, case-insensitive):
# stems rather than a list of names, so `sastoken`, `pkey`, `ssh_passphrase`, `oauth2_refresh`,
# `client_secret` are caught; a short stem (`sig`, `sas`, `pat`) only as a whole word
SECRET_KEY_RE = re.compile(
    r"key|secret|token|pass|pwd|cred|auth|jwt|bearer|cookie|private|session|signature|refresh|"
    r"connection_?string|(^|[^a-z])(sig|sas|pat|otp)([^a-z]|$)",
    re.IGNORECASE,
)
# the query parameters a stored or published URL may keep: they select a version of one object
# and grant nothing (s3fs `versionId`, gcsfs `generation`, a model hub's `revision`/`version`);
# every other parameter may be a credential whatever its name (SAS `sig`, OAuth `code`, ...)
PUBLIC_QUERY_PARAMS = frozenset({"versionId", "generation", "version", "revision"})
# their values: an opaque version id (S3's are URL-safe base64-like, at most 1024 bytes)
_PUBLIC_QUERY_VALUE = re.compile(r"[A-Za-z0-9._~+/=-]{1,1024}")
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)([^/@\s?#]+)@")
_TEXT_PATTERNS = (
    (re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + MASK),
    (
        re.compile(
            r"(?i)\b(AccountKey|SharedAccessSignature|SharedAccessKey|Password|Pwd|"
            r"aws_secret_access_key|aws_session_token|secret_?key)\s*[=:]\s*[^;&\s'\",}]+"
        ),
        r"\1=" + MASK,
    ),
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL
        ),
        MASK,
    ),
)


class SecretError(ValueError):
    """A value would carry a credential where it would be stored or published."""


def is_secret_key(name: str) -> bool:
    """True for option names that hold credentials (key, secret, token, Authorization, ...)."""
    return bool(SECRET_KEY_RE.search(str(name)))


def _decoded(text: str, rounds: int = 4) -> str:
    """`text` with percent-escapes decoded until none is left (`%2573` -> `%73` -> `s`)."""
    for _ in range(rounds):
        plain = unquote(text)
        if plain == text:
            break
        text = plain
    return text


def _param_name(raw: str) -> str:
    """A query parameter's name as a server would read it: decoded, `+` as space, spaces and
    `[]` suffixes dropped (`sig%20`, `sig+`, `sig[]`, `%73ig` are all `sig`)."""
    name = _decoded(unquote_plus(raw)).strip()
    return re.sub(r"(\[[^\]]*\])+$", "", name).strip()


def public_param(name: str, value: str) -> bool:
    """True when a query parameter may be stored and published: an allow-listed name with a plain
    value."""
    return _param_name(name) in PUBLIC_QUERY_PARAMS and bool(
        _PUBLIC_QUERY_VALUE.fullmatch(_decoded(value))
    )


def _query_pieces(query: str) -> list[tuple[str, str | None]]:
    """(name, value) of each `&`/`;`-separated piece; value None for a piece without `=`."""
    pieces = []
    for piece in re.split(r"[&;]", query):
        if piece:
            name, eq, value = piece.partition("=")
            pieces.append((name, value if eq else None))
    return pieces


def _shown_name(name: str, value: str | None) -> str:
    """A refused parameter's name for an error message; a piece without `=` may be the token
    itself."""
    name = _param_name(name)
    if value is None or not re.fullmatch(r"[A-Za-z0-9_.\[\] -]{1,40}", name):
        return "a parameter without a plain name"
    return name


def url_secret(url: str) -> str | None:
    """Why a URL may carry a credential (userinfo, a query parameter not on PUBLIC_QUERY_PARAMS,
    a fragment with parameters), or None. Only the name of what is refused is told, never a
    value."""
    if not isinstance(url, str):
        return None
    if _URL_USERINFO.search(url) or _URL_USERINFO.search(_decoded(url)):
        return "a user:password@ part"
    head, _, query = url.partition("?")
    fragment = head.partition("#")[2] if "://" in head else ""
    query = query.replace("#", "&")  # a fragment after the query is read like the query
    bad = [
        _shown_name(n, v) for n, v in _query_pieces(query) if v is None or not public_param(n, v)
    ]
    bad += [_shown_name(n, v) for n, v in _query_pieces(fragment) if v is not None]
    if bad:
        shown = ", ".join(sorted(set(bad)))
        return (
            f"query parameters other than {', '.join(sorted(PUBLIC_QUERY_PARAMS))} ({shown}); "
            "a query may hold a signature or a token"
        )
    return None


def public_url(url: str) -> str:
    """What may be shown of a URL: scheme, host and path, and its query only when every parameter is
    on the allow-list (a run.json written before URLs were checked may hold one that is not)."""
    url = _URL_USERINFO.sub(r"\1", url)
    if url_secret(url):
        head = url.partition("?")[0]
        return head.partition("#")[0] if "://" in head else head
    return url


def url_label(url: str) -> str:
    """The file name of a URL's path, for people (`epoch-7.pt`): never its query."""
    return posixpath.basename(public_url(url).partition("?")[0].rstrip("/"))


def check_url_secrets(url: str) -> str:
    """The URL, or SecretError when it carries credentials (they would be logged and published)."""
    why = url_secret(url)
    if why:
        raise SecretError(
            f"URLs with {why} are refused (the URL would be logged and published): "
            "use storage_options or environment variables for credentials"
        )
    return url


def value_secret(value: Any) -> str | None:
    """Why a string value looks like a credential (a bearer token, a key=..., a signed URL), or
    None."""
    if not isinstance(value, str):
        return None
    why = url_secret(value) if "://" in value else None  # any other text may hold a `?`
    if why:
        return why
    for pattern, _ in _TEXT_PATTERNS:
        if pattern.search(value):
            return "a credential in the text"
    return None


def find_secrets(obj: Any, path: str = "") -> list[str]:
    """Dotted paths in a nested dict/list whose key names a credential or whose value carries
    one."""
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
        return {
            k: (MASK if is_secret_key(k) and v not in (None, "") else mask_secrets(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [mask_secrets(v) for v in obj]
    return MASK if value_secret(obj) else obj


def public_options(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Storage options as they may be stored and published: allow-listed values, everything else
    masked."""
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


_QUERY_PARAM = re.compile(r"(?<=[?&#])([^=&?#\s'\"<>]{1,200}?)(\s*=\s*)([^&#\s'\"<>]*)")


def _mask_query(match: re.Match[str]) -> str:
    name, eq, value = match.groups()
    if not value or public_param(name, value):
        return match.group(0)
    return f"{_param_name(name) or name}{eq}{MASK}"


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>?]*\?[^\s'\"<>]*")


def _mask_url_query(match: re.Match[str]) -> str:
    """A URL in error text with each query piece that is not allow-listed masked, a bare one too."""
    head, _, query = match.group(0).partition("?")
    out = []
    for piece in re.split(r"([&;#])", query):
        if piece in ("", "&", ";", "#"):
            out.append(piece)
            continue
        name, eq, value = piece.partition("=")
        if not eq:
            out.append(MASK)
        elif public_param(name, value):
            out.append(piece)
        else:
            out.append(f"{name}={MASK}")
    return f"{head}?{''.join(out)}"


def scrub(text: str, storage_options: dict[str, Any] | None = None) -> str:
    """`text` with every credential we know of masked: option and AWS_* environment values, URL
    userinfo, every query parameter not on PUBLIC_QUERY_PARAMS, bearer tokens, key=value secrets,
    private keys. Percent-escapes are decoded first (`%73ig=` is `sig=`), and the text is returned
    decoded: a value masked in its escaped form would otherwise survive in its plain one."""
    known = _known_values(storage_options)
    text = str(text)
    for value in known:
        text = text.replace(value, MASK)
    # the escaped form first (`%26` stays inside a value), then the decoded one (`%73ig=` is `sig=`)
    text = _QUERY_PARAM.sub(_mask_query, _URL_IN_TEXT.sub(_mask_url_query, text))
    text = _decoded(text)
    for value in known:
        text = text.replace(value, MASK)
    text = _URL_USERINFO.sub(r"\1" + MASK + "@", text)
    text = _QUERY_PARAM.sub(_mask_query, _URL_IN_TEXT.sub(_mask_url_query, text))
    for pattern, repl in _TEXT_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def error_text(
    err: BaseException, storage_options: dict[str, Any] | None = None, limit: int = 2000
) -> str:
    """One line per error for status files, logs and the site: `Type: message`, scrubbed,
    bounded."""
    return scrub(f"{type(err).__name__}: {err}", storage_options)[:limit]
