"""The Proxmox API dialect over HTTP: ``{"data": ...}`` envelopes, error bodies, request values.

Success is ``{"data": ...}``; a failure is its HTTP status (proto/README.md's error table) with
``{"data": null, "message": ..., "errors": {field: reason}}``, except 401, which Proxmox answers
with ``{"data": null}`` alone. Parameters come from the path, the query string and a
form-encoded or JSON body, each read strictly (``rucher.pve.params``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from rucher.bus import RucherError
from rucher.gateway.config import MAX_BODY
from rucher.gateway.multipart import CutOffError, FileUpload, MultipartError, read_form
from rucher.proto.errors import HTTP_STATUS
from rucher.pve.params import (
    BAD_UTF8,
    ParamError,
    Value,
    merge,
    parse_json,
    parse_urlencoded,
)
from rucher.pve.values import Scalar

JSON = "application/json;charset=UTF-8"
_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Encoded:
    """A ``data`` value already encoded as JSON (cached answers skip encoding)."""

    json: bytes


def ok(data: Any) -> Response:
    """``{"data": data}``."""
    body = (
        b'{"data":' + data.json + b"}"
        if isinstance(data, Encoded)
        else _encoder.encode({"data": data})
    )
    return Response(body, media_type=JSON)


def failure(status: int, message: str, errors: Mapping[str, str] | None = None) -> Response:
    """An error body in Proxmox's shape."""
    if status == 401:
        return Response(b'{"data":null}', status_code=401, media_type=JSON)
    body: dict[str, Any] = {"data": None, "message": message}
    if errors:
        body["errors"] = dict(errors)
    return Response(_encoder.encode(body), status_code=status, media_type=JSON)


def from_error(err: RucherError) -> Response:
    """The response for an error a service (or the gateway itself) raised."""
    errors = None
    field = err.details.get("field")
    if isinstance(field, str):
        errors = {field: err.message}
    return failure(HTTP_STATUS[err.code], err.message, errors)


def from_param_error(err: ParamError) -> Response:
    """400 naming each bad field."""
    return failure(400, err.message, err.errors)


class BodyError(Exception):
    """A request body refused whole: too large (413) or in an unsupported format (415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> Response:
        """The error response."""
        return failure(self.status, self.message)


def _too_large() -> BodyError:
    return BodyError(413, f"request body larger than {MAX_BODY} bytes")


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


async def _stream(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client gone mid-body is a :class:`CutOffError`."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect as err:
        raise CutOffError("the client went away before the body ended") from err


async def _multipart(
    request: Request, file_param: str | None
) -> tuple[list[tuple[str, Scalar]], FileUpload | None]:
    """The fields of a multipart form and its file part, for an endpoint that takes a file."""
    if file_param is None:
        raise BodyError(415, "multipart/form-data is only accepted by upload endpoints")
    try:
        fields, upload = await read_form(
            _stream(request), request.headers["content-type"], file_param
        )
    except MultipartError as err:
        raise BodyError(400, f"malformed multipart/form-data body: {err}") from err
    if upload is not None:
        fields.append((file_param, upload.filename))
    return list(fields), upload


async def request_values(
    request: Request, *, file_param: str | None = None, repeatable: frozenset[str] = frozenset()
) -> dict[str, Value]:
    """Every parameter of the request: path, query string and body (form or JSON).

    Raises :class:`ParamError` for a field given twice, invalid UTF-8 or a malformed body, and
    :class:`BodyError` for a body too large or neither form-encoded nor JSON. An endpoint that
    takes a file (``file_param``) also accepts ``multipart/form-data``: the file's name becomes
    ``file_param`` and its bytes, still unread, wait in ``request.state.upload``. Parameters
    in ``repeatable`` (arrays) may be given several times.
    """
    path_values: list[tuple[str, Scalar]] = []
    for name, value in request.path_params.items():
        # The server decodes %-escapes with replacement characters: the raw bytes were not UTF-8.
        if "\ufffd" in value:
            raise ParamError({name: BAD_UTF8})
        path_values.append((name, value))
    query = parse_urlencoded(request.scope.get("query_string", b""))
    if request.method in {"GET", "HEAD", "DELETE"}:
        return merge(path_values, query, repeatable=repeatable)
    content_type = request.headers.get("content-type", _FORM).split(";")[0].strip().lower()
    if content_type == _MULTIPART:
        fields, request.state.upload = await _multipart(request, file_param)
        return merge(path_values, query, fields, repeatable=repeatable)
    raw = await _body(request)
    if not raw.strip():
        return merge(path_values, query, repeatable=repeatable)
    body: Sequence[tuple[str, Scalar]]
    if content_type == "application/json":
        body = parse_json(raw)
    elif content_type in {_FORM, ""}:
        body = parse_urlencoded(raw)
    else:
        raise BodyError(
            415, f"unsupported content type {content_type!r}: send form-encoded or JSON parameters"
        )
    return merge(path_values, query, body, repeatable=repeatable)
