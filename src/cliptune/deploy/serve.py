"""`cliptune serve`: a photo index behind a web page and a JSON API (FastAPI on uvicorn).

    GET  /                      the search page (static/index.html: no build step)
    GET  /api/info              what the index holds and the server's limits
    GET  /api/search?q=&k=      text query
    POST /api/search            a photo (multipart field "file") or JSON {"q": ..., "k": ...}
    GET  /api/similar?path=&k=  "more like this": the photos nearest an indexed photo
    GET  /thumbs/REL            cached JPEG thumbnail of an indexed photo
    GET  /photos/REL            the photo itself
    GET  /openapi.json          the API described (pydantic response models)

Safe by default (docs/reliability.md tests every row of its table of bad requests):
- A file is served only when its relative path is listed in the index AND, symlinks resolved, it
  lies inside the indexed folder: every traversal spelling (`..`, absolute, URL-encoded,
  double-encoded, backslashes) and symlinks pointing out are 404, as are folders (no listing).
- Text queries are text: a query that `Index.search` would read as a file path is refused, so no
  request can make the server open a file of its choosing.
- Request bodies are limited while they are read (Content-Length is checked first but not trusted);
  uploads must be JPEG/PNG/WebP/BMP/GIF/TIFF (Pillow's other decoders are never reached) within the
  image-pixel limit; k is bounded.
- Bound to a non-loopback address the server needs a token (`Authorization: Bearer`); without one it
  answers only requests addressed to a loopback name (a DNS-rebinding page cannot read it).
- Every error is JSON: {"error": "..."}.

With an index built on an ONNX export (`cliptune index --onnx`) nothing here imports torch.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from PIL import Image, UnidentifiedImageError

from cliptune.config import DEFAULT_MAX_IMAGE_PIXELS, UsageError
from cliptune.data.images import IMAGE_SUFFIXES, ImageError, decode_opened, own_pixel_limit
from cliptune.deploy.embedders import load_embedder
from cliptune.deploy.index import META_FILE, Index
from cliptune.deploy.thumbnails import THUMBNAIL_DIR, cached_thumbnail
from cliptune.extras import require

require("fastapi", "search", "the search server (cliptune serve)")
require("python_multipart", "search", "photo uploads to the search server")

from fastapi import APIRouter, Depends, FastAPI, Query, Request  # noqa: E402
from fastapi.concurrency import run_in_threadpool  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.openapi.utils import get_openapi  # noqa: E402
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response  # noqa: E402
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from starlette.datastructures import UploadFile  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
# Pillow decoders an uploaded query may reach: the formats `cliptune index` reads (the JPEG one also
# opens phones' MPO files). Pillow's others (EPS runs Ghostscript, for one) are never tried on uploads.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
FILE_CACHE = "private, max-age=3600"  # private: with a token, shared caches must not keep photos
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # the page may be opened with ?token=: never pass it on
]


# -- options -------------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: addresses no other machine can reach."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    """Address to bind. Anything but a loopback address needs `token`."""
    port: int = 8000
    """TCP port (0: any free one)."""
    token: str | None = None
    """Bearer token the API and files require (`Authorization: Bearer TOKEN`); None: no token."""
    max_upload_mb: float = 10.0
    """Largest request body (a query photo), in MB (10^6 bytes)."""
    max_k: int = 100
    """Most results one query may ask for."""
    default_k: int = 24
    """Results when a query names no k."""
    max_query_chars: int = 1000
    """Longest text query (the text encoder truncates far sooner)."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Uploaded and indexed photos with more pixels are refused (data.max_image_pixels)."""
    thumbnail_size: int = 256
    """Shorter side of the cached thumbnails, in pixels."""
    thumbnail_dir: Path | None = None
    """Thumbnail cache (default: INDEX/thumbnails)."""

    def __post_init__(self) -> None:
        def integer(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                raise UsageError(f"serve {name}: {value!r} must be an integer from {low}" +
                                 (f" to {high}" if high else " up"))

        integer("port", 0, 65535)
        integer("max_k", 1)
        integer("default_k", 1, self.max_k)
        integer("max_query_chars", 1)
        integer("max_image_pixels", 1)
        integer("thumbnail_size", 16, 4096)
        if not isinstance(self.max_upload_mb, (int, float)) or isinstance(self.max_upload_mb, bool) \
                or not self.max_upload_mb > 0:
            raise UsageError(f"serve --max-upload-mb: {self.max_upload_mb!r} must be a number > 0")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise UsageError("serve --token: give a non-empty token without spaces (it travels in an HTTP header)")
        if self.token is None and not is_loopback(self.host):
            raise UsageError(f"serve --host {self.host}: not a loopback address, so other machines could read "
                             "your photos; give --token (or CLIPTUNE_TOKEN) to require it, or bind 127.0.0.1")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


# -- the index, reloaded when it is rebuilt -----------------------------------------------------------

@dataclass(frozen=True)
class IndexSnapshot:
    """One loaded version of the index, with what serving files from it needs."""
    index: Index
    listed: frozenset[str]      # the index's relative paths: the only files the server may serve
    photo_root: Path            # resolved: a file must lie inside it once its symlinks are resolved
    signature: tuple[int, ...]  # meta.json's (mtime_ns, size, inode) when it was loaded

    def photo_file(self, relative: str) -> Path | None:
        """The photo at `relative`, if it is listed and, resolved, inside the photo folder; else None."""
        if relative not in self.listed:
            return None
        path = (self.photo_root / relative).resolve()
        return path if path.is_relative_to(self.photo_root) and path.is_file() else None

    def relative(self, path: str) -> str:
        return str(Path(path).relative_to(self.index.photo_root))


class LiveIndex:
    """The index in INDEX, reloaded (under a lock, reusing the loaded embedder when the new index
    names the same one) when its meta.json changes. `cliptune index` writes meta.json last, so a
    changed meta.json means a finished build; until then requests keep the version they have."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._failed: tuple[int, ...] | None = None
        self._snapshot = self._load(self._signature(), previous=None)

    def _signature(self) -> tuple[int, ...]:
        stat = (self.root / META_FILE).stat()
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _load(self, signature: tuple[int, ...], previous: Index | None) -> IndexSnapshot:
        index = Index.load(self.root)
        spec = index.meta["embedder"]
        if previous is not None and previous.embedder is not None and previous.meta["embedder"] == spec:
            index.embedder = previous.embedder  # a model load per rebuild would stall every request behind it
        else:
            index.embedder = load_embedder(spec)
        return IndexSnapshot(index, frozenset(index.paths), index.photo_root.resolve(), signature)

    def current(self) -> IndexSnapshot:
        snapshot = self._snapshot
        try:
            signature = self._signature()
        except OSError:  # meta.json being replaced, or the index removed: keep serving what is loaded
            return snapshot
        if signature == snapshot.signature or signature == self._failed:
            return snapshot
        with self._lock:
            if signature in (self._snapshot.signature, self._failed):
                return self._snapshot
            try:
                self._snapshot = self._load(signature, self._snapshot.index)
                self._failed = None
                log.info("%s: index reloaded (%d photos)", self.root, len(self._snapshot.listed))
            except Exception as err:  # noqa: BLE001 - a bad rebuild must not take the server down
                self._failed = signature
                log.warning("%s: the rebuilt index could not be loaded (%s); still serving the previous one",
                            self.root, err)
            return self._snapshot


# -- API models ----------------------------------------------------------------------------------------

class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in one line")


class Hit(BaseModel):
    path: str = Field(description="the photo's path relative to the indexed folder")
    score: float = Field(description="cosine similarity of the photo to the query (-1..1)")
    thumb: str = Field(description="URL of its cached thumbnail")
    photo: str = Field(description="URL of the photo")


class SearchResponse(BaseModel):
    query: str = Field(description="the text, the uploaded file's name, or the indexed photo's path")
    kind: Literal["text", "image", "similar"]
    k: int
    took_ms: float = Field(description="server time for the search, embedding the query included")
    indexed: int = Field(description="photos in the index")
    results: list[Hit] = Field(description="best first; at most k: a photo the server would not serve (a "
                                           "symlink out of the folder, a file deleted since the build) is left out")


class TextQuery(BaseModel):
    """The JSON body of POST /api/search."""
    q: str
    k: int | None = None


class IndexInfo(BaseModel):
    photos: int
    embedder: str = Field(description="'onnx' (onnxruntime, no torch) or 'torch'")
    dim: int
    default_k: int
    max_k: int
    max_upload_mb: float
    max_query_chars: int
    token_required: bool
    version: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


NOT_FOUND = "not found"  # one answer for every refused path: it says nothing about what exists
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in [
        (400, "bad query, k out of range, unreadable upload"), (401, "token missing"), (403, "wrong token"),
        (404, "not an indexed photo"), (413, "upload too large"), (415, "unsupported body type")]}

POST_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the query photo"},
        "k": {"type": "integer", "description": "number of results"}}}},
    "application/json": {"schema": {"$ref": "#/components/schemas/TextQuery"}}}}}


# -- queries -------------------------------------------------------------------------------------------

def looks_like_path(text: str) -> bool:
    """Whether `Index.search` would read `text` as an image file rather than a sentence
    (`cliptune.deploy.index.check_query`'s rule; tests/test_serve.py keeps the two equal)."""
    text = text.strip()
    has_separator = any(sep in text for sep in ("/", "\\")) and not any(c.isspace() for c in text)
    return Path(text).suffix.lower() in IMAGE_SUFFIXES or has_separator


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded photo -> upright 8-bit RGB, as `open_rgb` decodes files; ApiError 400 if it is none."""
    if not data:
        raise ApiError(400, "upload: empty file")
    try:
        with own_pixel_limit(), Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as image:
            return decode_opened(image, "upload", max_pixels)
    except ImageError as err:
        raise ApiError(400, str(err)) from None
    except UnidentifiedImageError:
        raise ApiError(400, "upload: not a JPEG, PNG, WebP, BMP, GIF or TIFF image") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ApiError(400, f"upload: unreadable image ({err})") from None


# -- the app -------------------------------------------------------------------------------------------

def create_app(index_dir: Path, options: ServeOptions | None = None) -> FastAPI:
    """The search server for the index in `index_dir` (its embedder is loaded now)."""
    import cliptune

    options = options or ServeOptions()
    live = LiveIndex(Path(index_dir))
    thumbnail_dir = Path(options.thumbnail_dir or Path(index_dir) / THUMBNAIL_DIR)
    page = PAGE.read_text(encoding="utf-8")

    app = FastAPI(title="cliptune photo search", version=cliptune.__version__,
                  description="Search an indexed photo folder by text or by photo.",
                  docs_url=None, redoc_url=None)  # their pages load scripts from a CDN
    app.state.live_index = live
    app.state.options = options

    def check_host(request: Request) -> None:
        # Without a token, a page on another site that rebinds its DNS name to 127.0.0.1 could read
        # the API; its requests carry that site's name as Host.
        host = request.headers.get("host", "")
        name = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        if options.token is None and not is_loopback(name):
            raise ApiError(400, f"Host {host!r} is not a loopback name: a server without --token answers "
                                "only http://127.0.0.1 or http://localhost")

    bearer = HTTPBearer(auto_error=False, description="the server's --token")

    def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if credentials is None:
            raise ApiError(401, "missing token: send the header Authorization: Bearer <token>",
                           {"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), options.token.encode()):
            raise ApiError(403, "wrong token")

    def servable_hits(snapshot: IndexSnapshot, query: str | Path | Image.Image, k: int) -> list[Hit]:
        """The k best photos the server will serve. A hit it would not (a symlink out of the folder, a
        file deleted since the build) is left out, and the index asked for more (rare: each ask embeds
        the query again)."""
        asked = k
        while True:
            found = snapshot.index.search(query, asked)
            out = []
            for path, score in found:
                relative = snapshot.relative(path)
                if snapshot.photo_file(relative) is not None:
                    url = quote(relative)
                    out.append(Hit(path=relative, score=round(score, 4), thumb=f"/thumbs/{url}",
                                   photo=f"/photos/{url}"))
            if len(out) >= k or len(found) < asked or asked >= len(snapshot.listed):
                return out[:k]
            asked = min(len(snapshot.listed), 2 * asked + (k - len(out)))

    def check_k(k: Any) -> int:
        if k is None:
            return options.default_k
        if isinstance(k, bool) or not isinstance(k, int):
            raise ApiError(422, f"k: expected an integer, got {k!r}")
        if not 1 <= k <= options.max_k:
            raise ApiError(400, f"k: {k} is out of range: give 1 to {options.max_k} (--max-k)")
        return k

    def check_text(q: Any) -> str:
        if q is None:
            q = ""
        if not isinstance(q, str):
            raise ApiError(422, f"q: expected a string, got {type(q).__name__}")
        text = q.strip()
        if not text:
            raise ApiError(400, "q: the query is empty: type a few words, or drop a photo")
        if len(text) > options.max_query_chars:
            raise ApiError(400, f"q: {len(text)} characters; at most {options.max_query_chars}")
        if looks_like_path(text):
            raise ApiError(400, f"q: {text!r} looks like a file path; search with words, or upload the photo")
        return text

    def search(snapshot: IndexSnapshot, query: str | Path | Image.Image, k: int, kind: str,
               label: str) -> SearchResponse:
        start = time.perf_counter()
        results = servable_hits(snapshot, query, k)
        took = 1000 * (time.perf_counter() - start)
        return SearchResponse(query=label, kind=kind, k=k, took_ms=round(took, 2), indexed=len(snapshot.listed),
                              results=results)

    guards = [Depends(check_host)] + ([Depends(check_token)] if options.token is not None else [])
    api = APIRouter(prefix="/api", dependencies=guards, responses=ERRORS)
    files = APIRouter(dependencies=guards, responses=ERRORS)

    @api.get("/info", response_model=IndexInfo, summary="what the index holds and the server's limits")
    def info() -> IndexInfo:
        snapshot = live.current()
        meta = snapshot.index.meta
        return IndexInfo(photos=len(snapshot.listed), embedder=str(meta["embedder"].get("kind")),
                         dim=int(meta.get("dim", 0)), default_k=options.default_k, max_k=options.max_k,
                         max_upload_mb=options.max_upload_mb, max_query_chars=options.max_query_chars,
                         token_required=options.token is not None, version=cliptune.__version__)

    @api.get("/search", response_model=SearchResponse, summary="the photos that best match a text query")
    def search_text(q: str = Query("", description="the query text"),
                    k: int | None = Query(None, description="number of results (default 24, at most --max-k)")
                    ) -> SearchResponse:
        k, text = check_k(k), check_text(q)
        return search(live.current(), text, k, "text", text)

    @api.post("/search", response_model=SearchResponse, openapi_extra=POST_BODY,
              summary="search by an uploaded photo (multipart 'file') or by JSON {q, k}")
    async def search_posted(request: Request) -> SearchResponse:
        snapshot = await run_in_threadpool(live.current)  # a reload loads a model: not on the event loop
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/json", "multipart/form-data"):
            raise ApiError(415, "POST /api/search takes multipart/form-data (a photo in the field \"file\") "
                                "or application/json {\"q\": ..., \"k\": ...}")
        body = await read_body(request, options.max_upload_bytes, options.max_upload_mb)
        if content_type == "application/json":
            try:
                payload = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
                raise ApiError(400, f"malformed JSON body: {getattr(err, 'msg', err)}{where}") from None
            except RecursionError:  # [[[[...]]]] a few thousand deep
                raise ApiError(400, "malformed JSON body: nested too deeply") from None
            if not isinstance(payload, dict):
                raise ApiError(400, f"JSON body: expected an object {{\"q\": ..., \"k\": ...}}, got "
                                    f"{type(payload).__name__}")
            unknown = sorted(set(payload) - {"q", "k"})
            if unknown:
                raise ApiError(400, f"JSON body: unknown field {unknown[0]!r} (expected q, k)")
            k, text = check_k(payload.get("k")), check_text(payload.get("q"))
            return await run_in_threadpool(search, snapshot, text, k, "text", text)
        form = await Request(request.scope, replay(body)).form(max_files=1, max_fields=2)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "multipart upload without a photo in the field \"file\"")
        k = check_k(form_integer(form.get("k"), "k"))
        data = await upload.read()
        image = await run_in_threadpool(decode_upload, data, options.max_image_pixels)
        label = Path(upload.filename or "upload").name
        return await run_in_threadpool(search, snapshot, image, k, "image", label)

    @api.get("/similar", response_model=SearchResponse, summary="more like this: the photos nearest an indexed one")
    def similar(path: str = Query(..., description="an indexed photo, relative to the photo folder"),
                k: int | None = Query(None, description="number of results")) -> SearchResponse:
        k = check_k(k)
        snapshot = live.current()
        photo = snapshot.photo_file(path)
        if photo is None:
            raise ApiError(404, NOT_FOUND)
        return search(snapshot, photo, k, "similar", path)

    @files.get("/thumbs/{relative:path}", response_class=FileResponse, summary="cached thumbnail of an indexed photo")
    def thumbnail(relative: str, request: Request) -> Response:
        snapshot = live.current()
        photo = snapshot.photo_file(relative)
        if photo is None:
            raise ApiError(404, NOT_FOUND)
        try:
            thumb = cached_thumbnail(photo, relative, thumbnail_dir, options.thumbnail_size, options.max_image_pixels)
        except ImageError as err:  # changed into something unreadable since it was indexed
            log.warning("thumbnail of %s: %s", relative, err)
            raise ApiError(404, NOT_FOUND) from None
        return file_response(thumb, request, "image/jpeg")

    @files.get("/photos/{relative:path}", response_class=FileResponse, summary="an indexed photo")
    def photo(relative: str, request: Request) -> Response:
        path = live.current().photo_file(relative)
        if path is None:
            raise ApiError(404, NOT_FOUND)
        return file_response(path, request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=[Depends(check_host)])
    def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    app.include_router(api)
    app.include_router(files)
    install_error_handlers(app)
    app.openapi = lambda: openapi_schema(app)
    app.add_middleware(SecurityHeaders, policy=content_security_policy(page))
    return app


def file_response(path: Path, request: Request, media_type: str | None = None) -> Response:
    """The file with Starlette's ETag and Last-Modified and a private cache lifetime; 304 when the
    browser's copy (If-None-Match) is current, so a revisit costs a stat, not the bytes."""
    response = FileResponse(path, media_type=media_type, stat_result=path.stat(),
                            headers={"Cache-Control": FILE_CACHE})
    etag = response.headers["etag"]
    if etag in [tag.strip() for tag in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": FILE_CACHE})
    return response


async def read_body(request: Request, limit: int, limit_mb: float) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes: a declared Content-Length
    is checked before reading, and the bytes are counted as they arrive, since a chunked body
    declares none and a declared one may lie. (FastAPI's own `max_body_size` answers an oversized
    Content-Length with a plain-text 413 from its middleware whenever a route answers before reading,
    e.g. on a missing token: this keeps every error JSON and names the flag.)"""
    too_large = ApiError(413, f"upload too large: more than {limit_mb:g} MB (--max-upload-mb)")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def form_integer(value: Any, name: str) -> int | None:
    """A multipart form field that must hold an integer (or be absent)."""
    if value is None:
        return None
    try:
        return int(value) if isinstance(value, str) else value
    except ValueError:
        raise ApiError(422, f"{name}: expected an integer, got {value!r}") from None


def replay(body: bytes):
    """An ASGI `receive` that hands over an already read body (for Starlette's form parser)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def install_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": "..."}, framework ones (unknown route, wrong method, bad type) included."""

    def answer(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return answer(err.status, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(err.status_code).phrase
        message = phrase.lower() if err.detail in (None, phrase) else str(err.detail)
        return answer(err.status_code, message, getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for problem in err.errors():
            name = ".".join(str(part) for part in problem["loc"][1:]) or str(problem["loc"][0])
            problems.append(f"{name}: {problem['msg']} (got {problem.get('input')!r})")
        return answer(422, "; ".join(problems))


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with its 422 answers described as the {"error": ...} this server sends."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        error = {"$ref": "#/components/schemas/ErrorResponse"}
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["TextQuery"] = TextQuery.model_json_schema()
        for operations in schema["paths"].values():
            for operation in operations.values():
                if "422" in operation.get("responses", {}):
                    operation["responses"]["422"] = {"description": "a parameter of the wrong type",
                                                     "content": {"application/json": {"schema": error}}}
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def content_security_policy(page: str) -> str:
    """Only the page's own inline script and style may run (by hash), images from this server (blob:
    for the ones fetched with a token), requests to this server only."""
    def allowed(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        digests = [base64.b64encode(hashlib.sha256(block.encode()).digest()).decode() for block in blocks]
        return " ".join(f"'sha256-{digest}'" for digest in digests) or "'none'"

    return (f"default-src 'none'; script-src {allowed('script')}; style-src {allowed('style')}; "
            "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


class SecurityHeaders:
    """nosniff, no framing, no referrer and a strict content policy on every response."""

    def __init__(self, app, policy: str):
        self.app = app
        self.headers = SECURITY_HEADERS + [(b"content-security-policy", policy.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.headers
            await send(message)

        return await self.app(scope, receive, send_with_headers)


# -- running it ----------------------------------------------------------------------------------------

def uvicorn_config(app: FastAPI, host: str, port: int, log_level: str = "warning"):
    """How `cliptune serve` runs the app (also used by ServerThread, so tests run the same settings)."""
    uvicorn = require("uvicorn", "search", "the search server (cliptune serve)")

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", server_header=False,
                          access_log=log_level in ("info", "debug", "trace"))


class ServerThread:
    """The server on a free loopback port in a background thread, for tests and notebooks:

        with ServerThread(create_app(index_dir)) as server:
            urllib.request.urlopen(server.url + "/api/search?q=a+dog")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        uvicorn = require("uvicorn", "search", "the search server (cliptune serve)")

        self.server = uvicorn.Server(uvicorn_config(app, host, port))
        self.thread = threading.Thread(target=self.server.run, name="cliptune-serve", daemon=True)
        self.url = ""

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the search server did not start (see its log above)")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
