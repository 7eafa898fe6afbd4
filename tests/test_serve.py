"""`cliptune serve`: the JSON API through FastAPI's test client, a running uvicorn for the table of bad
requests in docs/reliability.md (read from the doc, row by row), thumbnails, reloading a rebuilt index,
torch-free serving of an ONNX index, and a small load test."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import io
import json
import re
import select
import socket
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from cliptune.config import UsageError
from cliptune.deploy.embedders import OnnxEmbedder
from cliptune.deploy.index import Index, check_query

pytest.importorskip("fastapi")
from starlette.testclient import TestClient  # noqa: E402

from cliptune.deploy.serve import ServeOptions, ServerThread, create_app, looks_like_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
COLOURS = {"red.png": (220, 30, 30), "sub/green.jpg": (30, 200, 40), "sub/blue.png": (30, 40, 220),
           "a photo ü.png": (230, 220, 30), "big.jpg": (245, 245, 245)}


@pytest.fixture(scope="module")
def onnx_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    from cliptune.deploy.export import export_model

    return export_model(str(tiny_clip_dir), tmp_path_factory.mktemp("export"), onnx=True).out_dir / "onnx"


def make_layout(root: Path) -> Path:
    """photos/ with nested and oddly named photos; beside it, outside/secret.jpg, which photos/ reaches
    only through a symlinked file and a symlinked folder."""
    photos = root / "photos"
    for name, colour in COLOURS.items():
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        size = (600, 400) if name == "big.jpg" else (48, 36)
        pixels = Image.new("RGB", size, colour)
        pixels.paste((0, 0, 0), (0, 0, size[0] // 3, size[1] // 3))  # not flat: JPEG artefacts stay small
        pixels.save(photos / name)
    (root / "outside").mkdir()
    Image.new("RGB", (40, 40), (128, 0, 128)).save(root / "outside" / "secret.jpg")
    (root / "secret.jpg").write_bytes((root / "outside" / "secret.jpg").read_bytes())
    (photos / "link-out.jpg").symlink_to(root / "outside" / "secret.jpg")
    (photos / "linked-dir").symlink_to(root / "outside", target_is_directory=True)
    return photos


@pytest.fixture(scope="module")
def served(tmp_path_factory, onnx_dir) -> Path:
    """The index folder of the layout above, built with the tiny ONNX export."""
    root = tmp_path_factory.mktemp("serve")
    photos = make_layout(root)
    Index.build(photos, root / "index", OnnxEmbedder(onnx_dir), progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def client(served) -> TestClient:
    return TestClient(create_app(served), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def live(served):
    with ServerThread(create_app(served)) as server:
        yield server


@pytest.fixture(scope="module")
def live_with_token(served):
    with ServerThread(create_app(served, ServeOptions(token=TOKEN))) as server:
        yield server


def photos_of(index_dir: Path) -> Path:
    return Path(json.loads((index_dir / "meta.json").read_text())["photo_root"])


def servable(index_dir: Path, found: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """The library's hits, relative, without those that lead out of the photo folder (the server asks
    the index for more instead)."""
    root = photos_of(index_dir)
    return [(str(Path(p).relative_to(root)), s) for p, s in found if Path(p).resolve().is_relative_to(root.resolve())]


# -- searching ---------------------------------------------------------------------------------------


def test_text_search_answers_what_the_library_does(client, served):
    body = client.get("/api/search", params={"q": "a red photo", "k": 4}).json()
    expected = servable(served, Index.load(served).search("a red photo", k=100))[:4]
    assert [h["path"] for h in body["results"]] == [p for p, _ in expected]
    assert [h["score"] for h in body["results"]] == pytest.approx([s for _, s in expected], abs=1e-4)
    assert body["kind"] == "text" and body["k"] == 4 and body["indexed"] == len(Index.load(served).paths)
    odd = next(h for h in client.get("/api/search", params={"q": "a photo", "k": 20}).json()["results"]
               if h["path"] == "a photo ü.png")
    assert odd["thumb"] == "/thumbs/a%20photo%20%C3%BC.png" and client.get(odd["photo"]).status_code == 200
    # POST with JSON is the same search.
    posted = client.post("/api/search", json={"q": "a red photo", "k": 4}).json()
    assert [h["path"] for h in posted["results"]] == [h["path"] for h in body["results"]]


def test_default_k_and_photos_it_will_not_serve(client, served):
    index = Index.load(served)
    assert "link-out.jpg" in index.paths  # indexed: list_images follows the symlink
    everything = client.get("/api/search", params={"q": "a dog", "k": 100}).json()["results"]
    assert sorted(h["path"] for h in everything) == sorted(COLOURS)  # the links out are left out
    default = client.get("/api/search", params={"q": "a dog"}).json()["results"]
    assert [h["path"] for h in default] == [h["path"] for h in everything][:24]


@pytest.mark.parametrize("name", ["red.png", "sub/green.jpg", "big.jpg"])
def test_uploaded_photo_finds_itself_first(client, served, name):
    data = (photos_of(served) / name).read_bytes()
    body = client.post("/api/search", files={"file": (Path(name).name, data)}, data={"k": "3"}).json()
    assert body["kind"] == "image" and body["query"] == Path(name).name and len(body["results"]) == 3
    assert body["results"][0]["path"] == name and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_more_like_this_searches_by_the_indexed_photo(client, served):
    body = client.get("/api/similar", params={"path": "sub/blue.png", "k": 5}).json()
    expected = servable(served, Index.load(served).search(photos_of(served) / "sub" / "blue.png", k=100))[:5]
    assert body["kind"] == "similar" and body["query"] == "sub/blue.png"
    assert [h["path"] for h in body["results"]] == [p for p, _ in expected]
    assert body["results"][0]["path"] == "sub/blue.png"


def test_page_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="q"' in page.text and 'id="threshold"' in page.text and 'type="file"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/similar", "/api/info", "/thumbs/{relative}", "/photos/{relative}"} <= set(
        schema["paths"])
    search = schema["paths"]["/api/search"]
    assert search["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/SearchResponse")
    assert search["get"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse")
    assert set(search["post"]["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"SearchResponse", "Hit", "ErrorResponse", "TextQuery", "IndexInfo"} <= set(
        schema["components"]["schemas"])
    assert "HTTPValidationError" not in schema["components"]["schemas"]


@pytest.mark.parametrize("text", [
    "a dog", "dog.jpg", "Photo.PNG", "a/b", "../secret.jpg", "/etc/passwd", "C:\\photos\\x", "a dog/cat",
    "dogs and cats", "and/or", "50/50 chance", "x.tiff", "a.b", "   spaced.jpg  "])
def test_text_that_search_would_open_as_a_file_is_refused(text):
    """The server's rule is check_query's: a text `check_query` would treat as an image path (it
    raises for a missing file instead of returning text) is exactly what the server refuses."""
    try:
        read_as_path = not isinstance(check_query(text), str)
    except UsageError:  # "no such file" / "not an image file": it was read as a path
        read_as_path = True
    assert looks_like_path(text) == read_as_path


# -- files and thumbnails ---------------------------------------------------------------------------


def test_photo_is_served_as_it_is(client, served):
    response = client.get("/photos/sub/green.jpg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == (photos_of(served) / "sub" / "green.jpg").read_bytes()
    assert "max-age" in response.headers["cache-control"] and "private" in response.headers["cache-control"]


def test_thumbnail_is_made_once_and_cached(served, tmp_path, monkeypatch):
    import cliptune.deploy.thumbnails as thumbnails

    made = []
    real = thumbnails.make_thumbnail
    monkeypatch.setattr(thumbnails, "make_thumbnail", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    cache = tmp_path / "thumbs"
    app = create_app(served, ServeOptions(thumbnail_dir=cache))
    client = TestClient(app, base_url="http://127.0.0.1")
    first = client.get("/thumbs/big.jpg")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(first.content)).size == (384, 256)  # shorter side 256
    assert "max-age" in first.headers["cache-control"] and first.headers["etag"]
    second = client.get("/thumbs/big.jpg")
    assert second.content == first.content and len(made) == 1
    assert client.get("/thumbs/big.jpg", headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    small = client.get("/thumbs/red.png")  # smaller than 256: never scaled up
    assert Image.open(io.BytesIO(small.content)).size == (48, 36)
    assert len(list(cache.rglob("*.jpg"))) == 2 and not list(cache.rglob("*.tmp"))


def test_a_changed_photo_gets_a_new_thumbnail(tmp_path, onnx_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (300, 300), (200, 0, 0)).save(photos / "p.png")
    Index.build(photos, tmp_path / "index", OnnxEmbedder(onnx_dir), progress=False)
    client = TestClient(create_app(tmp_path / "index"), base_url="http://127.0.0.1")
    red = Image.open(io.BytesIO(client.get("/thumbs/p.png").content)).getpixel((5, 5))
    Image.new("RGB", (300, 300), (0, 0, 200)).save(photos / "p.png")
    blue = Image.open(io.BytesIO(client.get("/thumbs/p.png").content)).getpixel((5, 5))
    assert red[0] > 150 and blue[2] > 150, (red, blue)
    assert len(list((tmp_path / "index" / "thumbnails").rglob("*.jpg"))) == 2


def test_concurrent_requests_for_one_thumbnail(served, tmp_path):
    client = TestClient(create_app(served, ServeOptions(thumbnail_dir=tmp_path / "t")), base_url="http://127.0.0.1")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.get("/thumbs/big.jpg"), range(16)))
    assert {a.status_code for a in answers} == {200} and len({a.content for a in answers}) == 1
    assert len(list((tmp_path / "t").rglob("*.jpg"))) == 1 and not list((tmp_path / "t").rglob("*.tmp"))


# -- a rebuilt index is served without a restart -------------------------------------------------------


def test_rebuilt_index_is_picked_up(tmp_path, onnx_dir, monkeypatch):
    import cliptune.deploy.serve as serve

    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in [("red.png", (220, 30, 30)), ("blue.png", (30, 40, 220))]:
        Image.new("RGB", (40, 30), colour).save(photos / name)
    Index.build(photos, tmp_path / "index", OnnxEmbedder(onnx_dir), progress=False)
    loads = []
    real = serve.load_embedder
    monkeypatch.setattr(serve, "load_embedder", lambda spec: loads.append(spec) or real(spec))
    client = TestClient(create_app(tmp_path / "index"), base_url="http://127.0.0.1")
    before = client.get("/api/search", params={"q": "a photo", "k": 10}).json()
    assert sorted(h["path"] for h in before["results"]) == ["blue.png", "red.png"]
    assert client.get("/photos/green.png").status_code == 404

    Image.new("RGB", (44, 30), (30, 200, 40)).save(photos / "green.png")
    (photos / "red.png").unlink()
    Index.build(photos, tmp_path / "index", OnnxEmbedder(onnx_dir), progress=False)  # under the running app
    after = client.get("/api/search", params={"q": "a photo", "k": 10}).json()
    assert sorted(h["path"] for h in after["results"]) == ["blue.png", "green.png"]
    upload = client.post("/api/search", files={"file": ("g.png", (photos / "green.png").read_bytes())}).json()
    assert upload["results"][0]["path"] == "green.png" and upload["results"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert client.get("/photos/green.png").status_code == 200
    assert client.get("/photos/red.png").status_code == 404  # dropped from the index: no longer served
    assert client.get("/api/info").json()["photos"] == 2
    assert len(loads) == 1, "the reload loaded the embedder again instead of reusing it"


def test_a_broken_rebuild_keeps_the_loaded_index(served, tmp_path):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(served, index)
    client = TestClient(create_app(index), base_url="http://127.0.0.1")
    assert client.get("/api/search", params={"q": "a dog"}).status_code == 200
    (index / "meta.json").write_text("{ half written")
    response = client.get("/api/search", params={"q": "a dog", "k": 3})
    assert response.status_code == 200 and len(response.json()["results"]) == 3


# -- torch-free -----------------------------------------------------------------------------------


def test_serving_an_onnx_index_never_imports_torch(served):
    script = f"""
import sys
from starlette.testclient import TestClient
from cliptune.deploy.serve import create_app
client = TestClient(create_app({str(served)!r}), base_url="http://127.0.0.1")
text = client.get("/api/search", params={{"q": "a red photo", "k": 3}})
assert text.status_code == 200 and len(text.json()["results"]) == 3, text.text
photo = open({str(photos_of(served) / "red.png")!r}, "rb").read()
image = client.post("/api/search", files={{"file": ("q.png", photo)}})
assert image.json()["results"][0]["path"] == "red.png", image.text
assert client.get("/thumbs/red.png").status_code == 200
print(sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_cli_serve_of_an_onnx_index_is_light(served):
    """`cliptune serve` on an ONNX index configures its output without transformers and loads no torch
    (uvicorn's run is replaced so the command returns)."""
    script = f"""
import sys
import uvicorn
uvicorn.Server.run = lambda self, *args, **kwargs: None
from cliptune.apps.cli import main
code = main(["serve", {str(served)!r}, "--port", "0"])
print(code, sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout
    assert f"serving {len(Index.load(served).paths)} photos of" in out.stdout


def test_serve_options_are_checked():
    ServeOptions(host="0.0.0.0", token="t")
    ServeOptions(host="::1")
    ServeOptions(host="localhost")
    for bad in [dict(host="0.0.0.0"), dict(host="192.168.1.5"), dict(host="example.com"), dict(max_k=0),
                dict(default_k=101), dict(max_upload_mb=0), dict(token=""), dict(token="two words"), dict(port=70000)]:
        with pytest.raises(UsageError):
            ServeOptions(**bad)


def test_cli_refuses_what_is_not_an_index(tmp_path, capsys):
    from cliptune.apps.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    assert "not an index (no meta.json)" in capsys.readouterr().err


# -- the table of bad requests in docs/reliability.md ------------------------------------------------------


@dataclass(frozen=True)
class Row:
    case: str
    request: str
    status: str   # "404", or "exit 2" for the command line
    error: str


def bad_request_rows() -> list[Row]:
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    section = text.split("## Serving: bad requests", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith(("| case ", "| --- ")):
            continue
        case, request, answer = (cell.strip() for cell in line.strip()[2:-2].split(" | "))
        status, error = re.fullmatch(r"(\d{3}|exit \d+) `(.*)`", answer).groups()
        rows.append(Row(case, request, status, error))
    return rows


ROWS = bad_request_rows()
PLAIN = re.compile(r"`(GET|DELETE|POST) (\S+)`")


def raw_request(server, method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[str, str]:
    """The request target as written (http.client changes nothing in it)."""
    host, port = server.url.rsplit("/", 1)[-1].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = dict(headers or {})
    connection.putrequest(method, target, skip_host="Host" in headers, skip_accept_encoding=True)
    for name, value in headers.items():
        connection.putheader(name, value)
    if body is not None and "Content-Length" not in headers:
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    assert response.getheader("content-type") == "application/json", (response.status, payload)
    return str(response.status), json.loads(payload)["error"]


def multipart(fields: dict[str, tuple[str, bytes] | str]) -> tuple[bytes, str]:
    import httpx2

    files = {name: value for name, value in fields.items() if isinstance(value, tuple)}
    data = {name: value for name, value in fields.items() if isinstance(value, str)}
    request = httpx2.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"]


def upload(server, fields) -> tuple[str, str]:
    body, content_type = multipart(fields)
    return raw_request(server, "POST", "/api/search", {"Content-Type": content_type}, body)


def two_files(server) -> tuple[str, str]:
    import httpx2

    request = httpx2.Request("POST", "http://x/", files=[("file", ("a.png", png_header(4, 4))),
                                                         ("file", ("b.png", png_header(4, 4)))])
    return raw_request(server, "POST", "/api/search", {"Content-Type": request.headers["content-type"]},
                       request.read())


def json_body(server, body: bytes, content_type: str = "application/json") -> tuple[str, str]:
    return raw_request(server, "POST", "/api/search", {"Content-Type": content_type}, body)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost none (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def declared_huge_upload(server) -> tuple[str, str]:
    """Headers that announce 11 MB and no body: the answer must come without reading one."""
    _, content_type = multipart({"file": ("x.jpg", b"")})
    return raw_request(server, "POST", "/api/search", {"Content-Type": content_type, "Content-Length": "11000000"})


def chunked_huge_upload(server) -> tuple[str, str]:
    """11 MB in 64 KB chunks with no Content-Length, and never the chunk that ends the body: a server
    that waited for the whole body would never answer (the socket's timeout fails the test)."""
    host, port = server.url.rsplit("/", 1)[-1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    boundary = "cliptuneboundary"
    sock.sendall((f"POST /api/search HTTP/1.1\r\nHost: {host}:{port}\r\nTransfer-Encoding: chunked\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    sent, piece = 0, b"\xff" * 65536
    sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
    while sent < 11_000_000 and not select.select([sock], [], [], 0)[0]:  # until the server answers
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
    response = http.client.HTTPResponse(sock)
    response.begin()
    payload = response.read()
    sock.close()
    return str(response.status), json.loads(payload)["error"]


def cli_non_loopback(server, served) -> tuple[str, str]:
    from cliptune.apps.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["serve", str(served), "--host", "0.0.0.0"])
    return f"exit {code}", err.getvalue().strip()


BUILT = {
    "huge upload, declared": lambda s, t, i: declared_huge_upload(s),
    "huge upload, chunked": lambda s, t, i: chunked_huge_upload(s),
    "decompression bomb": lambda s, t, i: upload(s, {"file": ("bomb.png", png_header(20000, 20000))}),
    "non-image upload": lambda s, t, i: upload(s, {"file": ("photo.jpg", b"just some text, not pixels\n" * 10)}),
    "image format not allowed for uploads": lambda s, t, i: upload(s, {"file": (
        "x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n")}),
    "empty upload": lambda s, t, i: upload(s, {"file": ("empty.jpg", b"")}),
    "upload without its field": lambda s, t, i: upload(s, {"photo": ("x.png", png_header(4, 4))}),
    "other body type": lambda s, t, i: json_body(s, b"a dog", "text/plain"),
    "malformed JSON": lambda s, t, i: json_body(s, b'{"q": "a dog",'),
    "JSON nested 100,000 deep": lambda s, t, i: json_body(s, b"[" * 100_000),
    "two photos in one upload": lambda s, t, i: two_files(s),
    "JSON that is not an object": lambda s, t, i: json_body(s, b'["a dog"]'),
    "JSON with an unknown field": lambda s, t, i: json_body(s, b'{"q": "a dog", "n": 5}'),
    "JSON k as a string": lambda s, t, i: json_body(s, b'{"q": "a dog", "k": "5"}'),
    "query too long": lambda s, t, i: raw_request(s, "GET", "/api/search?q=" + "a" * 1001),
    "another site's name (DNS rebinding)": lambda s, t, i: raw_request(s, "GET", "/api/info",
                                                                       {"Host": "evil.example"}),
    "non-loopback bind without a token": lambda s, t, i: cli_non_loopback(s, i),
    "missing token": lambda s, t, i: raw_request(t, "GET", "/api/search?q=a+dog"),
    "wrong token": lambda s, t, i: raw_request(t, "GET", "/api/search?q=a+dog", {"Authorization": "Bearer wrong"}),
    "token in the URL instead of the header": lambda s, t, i: raw_request(t, "GET", f"/api/search?q=a+dog&token={TOKEN}"),
    "photo without the token": lambda s, t, i: raw_request(t, "GET", "/photos/red.png"),
}


def test_the_table_and_the_test_name_the_same_cases():
    cases = [row.case for row in ROWS]
    assert len(cases) == len(set(cases)) and len(cases) >= 40, cases
    figures = " ".join((REPO / "docs" / "reliability.md").read_text(encoding="utf-8").split())
    assert f"{len(cases)} bad requests to the search server" in figures, "update the count under Figures"
    assert not set(BUILT) - set(cases), f"built here, missing from docs/reliability.md: {set(BUILT) - set(cases)}"
    unbuilt = [r.case for r in ROWS if r.case not in BUILT and not PLAIN.fullmatch(r.request)]
    assert not unbuilt, f"rows that are neither `METHOD target` nor built here: {unbuilt}"


@pytest.mark.parametrize("row", ROWS, ids=[row.case for row in ROWS])
def test_bad_request_gets_the_documented_answer(row, live, live_with_token, served):
    if row.case in BUILT:
        answer = BUILT[row.case](live, live_with_token, served)
    else:
        method, target = PLAIN.fullmatch(row.request).groups()
        answer = raw_request(live, method, target)
    assert answer == (row.status, row.error)


def test_the_same_requests_with_the_token_succeed(live_with_token):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for target in ["/api/search?q=a+dog&k=2", "/api/info", "/photos/red.png", "/thumbs/red.png", "/"]:
        host, port = live_with_token.url.rsplit("/", 1)[-1].rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", target, headers=auth)
        assert connection.getresponse().status == 200, target
        connection.close()


def test_a_served_file_must_be_listed_even_inside_the_folder(live, served):
    """A file that lies in the photo folder but is not in the index (added after the build) is not served."""
    extra = photos_of(served) / "added-later.png"
    Image.new("RGB", (8, 8)).save(extra)
    try:
        assert raw_request(live, "GET", "/photos/added-later.png") == ("404", "not found")
    finally:
        extra.unlink()


# -- load -------------------------------------------------------------------------------------------


def test_small_load_test_has_no_errors(served):
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    sys.modules["serve_load"] = serve_load  # its dataclass looks itself up there
    spec.loader.exec_module(serve_load)
    result = serve_load.run_load(served, clients=2, seconds=1.0, k=5, thumbs=True, warmup=0.5)
    assert result["errors"] == 0, result["first_errors"]
    assert result["by_kind"]["search"]["requests"] >= 2 and result["by_kind"]["thumb"]["requests"] >= 2, result
    assert result["by_kind"]["search"]["p50_ms"] <= result["by_kind"]["search"]["p99_ms"]


def test_threads_share_one_server_safely(client):
    """Concurrent text, photo and more-like-this queries each get their own answer."""
    queries = [("get", {"q": "a red photo", "k": 3}), ("similar", {"path": "sub/blue.png", "k": 3})] * 6
    expected = {}
    for kind, params in queries[:2]:
        expected[kind] = client.get("/api/search" if kind == "get" else "/api/similar", params=params).json()["results"]

    def ask(item):
        kind, params = item
        return kind, client.get("/api/search" if kind == "get" else "/api/similar", params=params).json()["results"]

    with ThreadPoolExecutor(6) as pool:
        for kind, results in pool.map(ask, queries):
            assert [h["path"] for h in results] == [h["path"] for h in expected[kind]]
