"""Request bodies: JSON, or multipart/form-data (what the openai client sends to POST /v1/videos).

The gateway stays free of python-multipart: a form is parsed with the standard library's MIME parser.
File parts (e.g. `input_reference`) are reported so the caller can refuse them with a clear message.
"""

from __future__ import annotations

import json
from email import policy
from email.parser import BytesParser
from typing import Any

from diffdisagg.worker.gateway.errors import APIError

FILE_MARKER = "<file>"


def parse_body(content_type: str | None, body: bytes) -> dict[str, Any]:
    """Body -> dict; malformed input raises APIError(400), never FastAPI's default shape."""
    ctype = (content_type or "application/json").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        return _json(body)
    if ctype == "multipart/form-data":
        return _multipart(content_type or "", body)
    if ctype == "application/x-www-form-urlencoded":
        from urllib.parse import parse_qsl

        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    raise APIError(
        415, f"unsupported content type {ctype!r}; send application/json", code="unsupported_media_type"
    )


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def _multipart(content_type: str, body: bytes) -> dict[str, Any]:
    if "boundary=" not in content_type:
        raise APIError(400, "multipart body without a boundary", code="invalid_multipart")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise APIError(400, "malformed multipart body", code="invalid_multipart")
    out: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        if part.get_filename() is not None:
            out[str(name)] = FILE_MARKER
            continue
        payload = part.get_payload(decode=True) or b""
        out[str(name)] = payload.decode("utf-8", "replace")
    return out
