"""Tests of :mod:`dien_tutorial.data.download` against a local HTTP server.

The server listens on 127.0.0.1 only, on a free port, and serves small files
written into tmp_path; no test reaches beyond this machine.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import stat
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dien_tutorial.data.download import (
    AMAZON_2014_FILES,
    DownloadError,
    _opener,
    amazon_2014_urls,
    download,
    file_sha256,
)

PAYLOAD = b'{"reviewerID": "U1", "asin": "B01", "unixReviewTime": 1}\n' * 5000


@dataclass
class Server:
    """A running local file server and the paths it was asked for."""

    url: str
    root: Path
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    (root / "reviews_Toys_5.json.gz").write_bytes(PAYLOAD)
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args) -> None:  # keep test output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield Server(url=f"http://{host}:{port}", root=root, requests=requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_download_with_good_checksum(server, tmp_path):
    dest = tmp_path / "out" / "reviews.json.gz"
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    got = download(f"{server.url}/reviews_Toys_5.json.gz", dest, sha256=digest, progress=False)
    assert got == dest
    assert dest.read_bytes() == PAYLOAD
    assert file_sha256(dest) == digest
    # Only the file itself is left: the temporary file was renamed into place.
    assert [p.name for p in dest.parent.iterdir()] == ["reviews.json.gz"]
    assert server.requests == ["/reviews_Toys_5.json.gz"]


def test_checksum_mismatch_raises_and_leaves_nothing(server, tmp_path):
    dest = tmp_path / "out" / "reviews.json.gz"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/reviews_Toys_5.json.gz", dest, sha256=wrong, progress=False)
    message = str(err.value)
    assert str(dest) in message
    assert f"expected sha256 {wrong}" in message
    assert f"got {hashlib.sha256(PAYLOAD).hexdigest()}" in message
    assert list(dest.parent.iterdir()) == []


def test_checksum_mismatch_keeps_an_existing_file_untouched(server, tmp_path):
    dest = tmp_path / "reviews.json.gz"
    dest.write_bytes(b"old contents")
    with pytest.warns(UserWarning, match="downloading it again"), pytest.raises(DownloadError):
        download(f"{server.url}/reviews_Toys_5.json.gz", dest, sha256="ab" * 32, progress=False)
    assert dest.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reviews.json.gz", "served"]


def test_404_is_a_clear_error(server, tmp_path):
    dest = tmp_path / "missing.json.gz"
    url = f"{server.url}/meta_Nothing.json.gz"
    with pytest.raises(DownloadError, match=rf"{url}: the server answered HTTP 404"):
        download(url, dest, progress=False)
    assert not dest.exists()
    assert list(tmp_path.glob("*.part")) == []


def test_present_file_with_right_checksum_is_not_fetched(server, tmp_path):
    dest = tmp_path / "reviews.json.gz"
    dest.write_bytes(PAYLOAD)
    download(f"{server.url}/reviews_Toys_5.json.gz", dest, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)
    download(f"{server.url}/reviews_Toys_5.json.gz", dest, progress=False)  # no checksum: trust it
    assert server.requests == []


def test_present_file_with_wrong_checksum_is_replaced(server, tmp_path):
    dest = tmp_path / "reviews.json.gz"
    dest.write_bytes(b"truncated")
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    with pytest.warns(UserWarning, match="does not match"):
        download(f"{server.url}/reviews_Toys_5.json.gz", dest, sha256=digest.upper(), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == ["/reviews_Toys_5.json.gz"]


def test_progress_bar_goes_to_stderr(server, tmp_path, capsys):
    download(f"{server.url}/reviews_Toys_5.json.gz", tmp_path / "r.gz", progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "r.gz" in err and "100%" in err


def test_only_http_urls(tmp_path):
    (tmp_path / "local.txt").write_text("x")
    with pytest.raises(ValueError, match="only http:// and https:// URLs"):
        download((tmp_path / "local.txt").as_uri(), tmp_path / "copy.txt", progress=False)


def test_amazon_2014_urls():
    assert AMAZON_2014_FILES == {
        "reviews": "reviews_{category}_5.json.gz",
        "meta": "meta_{category}.json.gz",
    }
    for base in ("http://mirror.example/amazon", "http://mirror.example/amazon/"):
        assert amazon_2014_urls("Toys_and_Games", base) == {
            "reviews": "http://mirror.example/amazon/reviews_Toys_and_Games_5.json.gz",
            "meta": "http://mirror.example/amazon/meta_Toys_and_Games.json.gz",
        }
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        amazon_2014_urls("../etc", "http://mirror.example/")


# ---------------------------------------------------------------------------
# Redirects, destinations, checksum arguments and file modes
# ---------------------------------------------------------------------------


@contextmanager
def redirecting_server(location: str) -> Iterator[tuple[str, list[str]]]:
    """A 127.0.0.1 server answering every GET with ``302 Location: location``."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            requests.append(self.path)
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args) -> None:  # keep test output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield f"http://{host}:{port}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def trap() -> Iterator[socket.socket]:
    """A listening 127.0.0.1 socket that no download may connect to."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def test_redirect_to_ftp_is_refused_before_any_connection(tmp_path, trap):
    target = f"ftp://127.0.0.1:{trap.getsockname()[1]}/reviews_Toys_5.json.gz"
    dest = tmp_path / "out" / "reviews.json.gz"
    with redirecting_server(target) as (base, requests):
        with pytest.raises(DownloadError) as err:
            download(f"{base}/reviews_Toys_5.json.gz", dest, progress=False, timeout=2)
    message = str(err.value)
    assert message.startswith(f"{base}/reviews_Toys_5.json.gz: refused to follow a redirect to {target}")
    assert "the scheme ftp: is not http: or https:" in message
    assert requests == ["/reviews_Toys_5.json.gz"]
    # Nobody knocked on the ftp port: the redirect was refused, not tried.
    with pytest.raises(BlockingIOError):
        trap.accept()
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("target", ["file:///etc/hostname", "data:,hello"])
def test_redirect_to_a_local_scheme_is_refused(tmp_path, target):
    with redirecting_server(target) as (base, _):
        with pytest.raises(DownloadError, match=rf"{base}/x: .*{re.escape(target)}.* not allowed"):
            download(f"{base}/x", tmp_path / "x", progress=False, timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_redirect_to_http_is_followed(server, tmp_path):
    with redirecting_server(f"{server.url}/reviews_Toys_5.json.gz") as (base, _):
        download(f"{base}/moved", tmp_path / "r.gz", progress=False)
    assert (tmp_path / "r.gz").read_bytes() == PAYLOAD


def test_opener_speaks_http_only():
    handlers = _opener().handlers
    local = (urllib.request.FTPHandler, urllib.request.FileHandler, urllib.request.DataHandler)
    assert not any(isinstance(h, local) for h in handlers)
    assert any(isinstance(h, urllib.request.HTTPHandler) for h in handlers)


def test_destination_that_is_a_folder_is_refused_before_fetching(server, tmp_path):
    dest = tmp_path / "reviews.json.gz"
    dest.mkdir()
    with pytest.raises(DownloadError, match=rf"^{re.escape(str(dest))}: is a folder"):
        download(f"{server.url}/reviews_Toys_5.json.gz", dest, progress=False)
    assert server.requests == []
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("bad", [
    "sha256:" + hashlib.sha256(PAYLOAD).hexdigest(),
    hashlib.sha256(PAYLOAD).hexdigest()[:-1],
    "g" * 64,
    "",
])
def test_malformed_checksum_argument_is_refused_before_fetching(server, tmp_path, bad):
    with pytest.raises(ValueError, match=rf"sha256 must be 64 hexadecimal digits, got {re.escape(repr(bad))}"):
        download(f"{server.url}/reviews_Toys_5.json.gz", tmp_path / "r.gz", sha256=bad, progress=False)
    assert server.requests == []
    assert list(tmp_path.glob("r.gz*")) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_downloaded_file_mode_follows_the_umask(server, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        got = download(f"{server.url}/reviews_Toys_5.json.gz", tmp_path / "r.gz", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(got.stat().st_mode) == mode
