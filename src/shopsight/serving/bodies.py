"""Request bodies of the HTTP API: strict JSON whatever the Content-Type, and error details safe to echo.

Python's :func:`json.loads` takes more than JSON (RFC 8259): ``NaN`` and ``Infinity``, and ``"\\ud800"``
(a lone surrogate, which no UTF-8 can carry). Starlette's parser let them through, so the schema's 422
named them back, and writing that answer failed (NaN is not JSON; a surrogate does not encode): a 500.
Here the body is parsed once, before FastAPI sees it, and anything JSON forbids is a 422 that names the
field. Bodies that do not parse at all (not UTF-8, nested past the recursion limit, an integer with more
digits than Python converts) are 422s too, with the same body as every validation error, instead of
FastAPI's undocumented 400.

:func:`error_details` makes validation errors safe and small to send back: each echoed ``input`` is a
preview of at most :data:`PREVIEW_CHARS` characters, never the request itself, and every string is
valid UTF-8.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

PREVIEW_CHARS = 100

# An escaped surrogate in the text (\uD800-\uDFFF): a pair of them is a valid character, a lone one is
# not; only bodies that have one are searched for lone ones.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class _Invalid:
    """Stands in for a value JSON does not have (NaN, Infinity) until its place in the body is known."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def parse_json(body: bytes) -> Any:
    """``body`` as JSON (RFC 8259), or :class:`RequestValidationError` naming what is wrong, and where."""
    try:
        text = body.decode("utf-8")  # JSON between systems is UTF-8 (RFC 8259 section 8.1)
    except UnicodeDecodeError as exc:
        raise _invalid(("body",), f"not UTF-8 (byte {exc.start}: {body[exc.start]:#04x})") from None
    found: list[_Invalid] = []

    def constant(name: str) -> _Invalid:  # only called for NaN, Infinity, -Infinity: rare, so cheap
        found.append(_Invalid(f"{name} is not a JSON value"))
        return found[-1]

    try:
        value = json.loads(text, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise _invalid(("body",), f"JSON decode error at character {exc.pos}: {exc.msg}") from None
    except RecursionError:
        raise _invalid(("body",), "JSON nested too deeply") from None
    except ValueError:  # only int() raises it: a number of more digits than it converts
        limit = sys.get_int_max_str_digits()
        raise _invalid(("body",), f"a number of more than {limit} digits") from None
    if found or _SURROGATE_ESCAPE.search(text):  # the walk is paid only by bodies that need it
        where = _first_non_json(value)
        if where is not None:
            raise _invalid(("body", *where[0]), where[1])
    return value


def _first_non_json(value: Any) -> tuple[tuple, str] | None:
    """The path of the first value (or key) that JSON cannot carry, and the problem; iterative: the body
    may be nested almost as deep as the recursion limit."""
    lone = "a lone surrogate (\\ud800-\\udfff): not valid Unicode"
    stack = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, _Invalid):
            return path, item.problem
        if isinstance(item, str):
            if _lone_surrogate(item):
                return path, f"a string with {lone}"
        elif isinstance(item, dict):
            for key in item:
                if _lone_surrogate(key):
                    return (*path, key), f"a key with {lone}"
            stack.extend(((*path, key), child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(((*path, i), child) for i, child in reversed(list(enumerate(item))))
    return None


def _lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _invalid(loc: tuple, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "json_invalid", "loc": loc, "msg": message, "input": None}])


class _JsonRequest(Request):
    """The request with its body already read and parsed."""

    def __init__(self, scope, receive, body: bytes, value: Any) -> None:
        super().__init__(scope, receive)
        self._parsed = body, value

    async def body(self) -> bytes:
        return self._parsed[0]

    async def json(self) -> Any:
        return self._parsed[1]


class JsonBodyRoute(APIRoute):
    """A route whose body is JSON whatever its Content-Type says, parsed by :func:`parse_json`.

    ``curl -d '{...}'`` (the README's and the demo's calls) sends ``application/x-www-form-urlencoded``,
    which FastAPI would hand to the schema as bytes: a 422. Taking JSON from any Content-Type opens no
    cross-site hole here: every such route needs an API key header, which a browser sends cross-site
    only after a CORS preflight that this API never grants. (FastAPI's documented hook for this:
    a custom ``APIRoute.get_route_handler``.)
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def parse_then_handle(request: Request) -> Response:
            body = await request.body()  # the route's max_body_size counts these bytes (413)
            if not body:  # the schema says what is missing
                return await handle(request)
            value = parse_json(body)
            scope = request.scope
            if _JSON_CONTENT_TYPE not in scope["headers"]:  # so that FastAPI takes the parsed value
                headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                scope = {**scope, "headers": [*headers, _JSON_CONTENT_TYPE]}
            return await handle(_JsonRequest(scope, request.receive, body, value))

        return parse_then_handle


# --------------------------------------------------------------------------------------- error details

_PREVIEW = reprlib.Repr()
_PREVIEW.maxlevel, _PREVIEW.maxstring, _PREVIEW.maxother = 3, 40, 40
_PREVIEW.maxlist = _PREVIEW.maxdict = _PREVIEW.maxset = _PREVIEW.maxtuple = 8


def safe_text(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters, lone surrogates written as ``\\udXXX``: valid UTF-8."""
    if len(text) > limit:
        text = text[:limit] + "…"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def preview(value: Any) -> Any:
    """A short, JSON-safe stand-in for an input echoed in an error: never the (maybe megabytes of)
    input itself, never NaN or a lone surrogate."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**PREVIEW_CHARS else safe_text(str(value))
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return safe_text(value)
    return safe_text(_PREVIEW.repr(value))  # bounded depth and length, whatever the container holds


def error_details(errors: list[dict]) -> list[dict]:
    """Pydantic's / FastAPI's validation errors as JSON-safe dicts with short previews of the input."""
    out = []
    for error in errors:
        detail = {
            "type": str(error.get("type", "")),
            "loc": [p if isinstance(p, int) else safe_text(str(p)) for p in error.get("loc", ())],
            "msg": safe_text(str(error.get("msg", "")), 300),
            "input": preview(error.get("input")),
        }
        if error.get("ctx"):
            detail["ctx"] = {str(k): preview(v if isinstance(v, int | float | str) else str(v))
                             for k, v in error["ctx"].items()}  # fmt: skip
        out.append(detail)
    return out
