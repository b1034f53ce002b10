"""Fetch data files over HTTP(S), safely and only when needed.

:func:`download` streams a URL into a temporary file next to the
destination, checks its SHA-256 when one is given, and only then renames it
into place. A failed or interrupted download therefore never leaves a
half-written file under the final name, and a file that is already there
with the right checksum is not fetched again. Only HTTP(S) is spoken: the
URL and every redirect it leads to must be ``http://`` or ``https://``.

The Amazon review data of 2014 (the files the DIN and DIEN papers use) is
published by the UCSD McAuley lab, one pair of files per product category:

- ``reviews_<Category>_5.json.gz``: the 5-core reviews, JSON lines;
- ``meta_<Category>.json.gz``: product metadata, one Python ``repr`` per line.

:data:`AMAZON_2014_FILES` holds those name patterns and
:func:`amazon_2014_urls` joins them to a base URL. There is deliberately no
default host: pass the address of the mirror you use (the lab has moved
the files more than once). :func:`dien_tutorial.data.amazon.load_amazon_raw`
reads the two files.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import IO

from tqdm import tqdm

AMAZON_2014_FILES: dict[str, str] = {
    "reviews": "reviews_{category}_5.json.gz",
    "meta": "meta_{category}.json.gz",
}
"""File-name patterns of the McAuley Amazon 2014 release, per category.

``category`` is spelled as in the file names, e.g. ``Electronics``,
``Books`` or ``Toys_and_Games``.
"""

_CHUNK = 1 << 16  # 64 KiB: small enough for a smooth progress bar

_SCHEMES = ("http", "https")


class DownloadError(RuntimeError):
    """A download failed: HTTP error, network error, refused redirect, or wrong checksum."""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only.

    urllib's own handler refuses ``file:`` and ``data:`` targets but follows
    ``ftp:``, so a server (or anyone on the path of a plain-http request)
    could send the download to another protocol and host.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib's hook)
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in _SCHEMES:
            fp.close()
            raise DownloadError(
                f"{req.full_url}: refused to follow a redirect to {newurl}: "
                f"the scheme {scheme + ':' if scheme else '(none)'} is not http: or https:"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    """An opener that speaks HTTP(S) and nothing else.

    Built handler by handler instead of with ``build_opener``, which would
    add the ftp:, file: and data: handlers too. Proxies from the environment
    are still honoured, as by ``urlopen``.
    """
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        _HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def amazon_2014_urls(category: str, base_url: str) -> dict[str, str]:
    """URLs of the reviews and meta files of one Amazon 2014 category.

    Args:
        category: as spelled in the file names, e.g. ``"Toys_and_Games"``.
        base_url: the folder URL of your mirror of the McAuley lab files;
            a trailing slash is optional.

    Returns:
        ``{"reviews": url, "meta": url}``.

    Raises:
        ValueError: the category holds characters no file name has (this
            stops a ``/`` or ``..`` from reaching into another folder).
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", category):
        raise ValueError(
            f"category {category!r} should be letters, digits and underscores, "
            "as in the file names (e.g. 'Toys_and_Games')"
        )
    base = base_url.rstrip("/") + "/"
    return {
        kind: urllib.parse.urljoin(base, pattern.format(category=category))
        for kind, pattern in AMAZON_2014_FILES.items()
    }


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying it if asked.

    If ``dest`` already exists and either no checksum is given or its
    checksum matches, nothing is fetched. If it exists with a different
    checksum it is fetched again, and replaced only once the new copy
    verifies.

    Args:
        url: an ``http://`` or ``https://`` URL.
        dest: the file to write; its folder is created if needed. A new
            file gets the usual permissions (``0o666`` less the umask).
        sha256: expected hex digest of the file (64 hex digits, either
            case), or ``None`` to skip the check.
        progress: show a tqdm progress bar (on stderr).
        timeout: seconds to wait for the server on each network operation.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the URL is not HTTP(S), or ``sha256`` is not 64 hex
            digits; both are checked before anything is fetched.
        DownloadError: ``dest`` is a folder, the server answered with an
            error or redirected to a URL that is not HTTP(S), the connection
            failed or ended early, or the checksum did not match (the
            message names the file and both digests). In every case
            ``dest`` is left as it was and no temporary file remains.
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    # urllib also opens file:, ftp: and data: URLs; a data download should
    # not quietly read a local file because of a typo in a config.
    if scheme not in _SCHEMES:
        raise ValueError(f"{url}: only http:// and https:// URLs are downloaded")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(
            f"sha256 must be 64 hexadecimal digits, got {sha256!r}; "
            "pass None to download without a check"
        )
    expected = sha256.lower() if sha256 is not None else None
    if dest.is_dir():
        raise DownloadError(f"{dest}: is a folder; give the path of the file to write")

    if dest.is_file():
        if expected is None:
            return dest
        actual = file_sha256(dest)
        if actual == expected:
            return dest
        warnings.warn(
            f"{dest}: checksum {actual} does not match {expected}; downloading it again",
            stacklevel=2,
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = _create_part_file(dest)
    try:
        with handle:
            actual = _stream(url, handle, dest.name, progress, timeout)
        if expected is not None and actual != expected:
            raise DownloadError(
                f"{dest}: checksum mismatch for {url}: expected sha256 {expected}, "
                f"got {actual}; the download was discarded"
            )
        os.replace(tmp, dest)
    finally:
        # After a successful replace tmp no longer exists; otherwise clean up.
        tmp.unlink(missing_ok=True)
    return dest


def _create_part_file(dest: Path) -> tuple[IO[bytes], Path]:
    """Create a new, empty temporary file beside ``dest``; return it open and its path.

    Same folder as ``dest``, so the final ``os.replace`` is a rename on one
    file system: atomic, never a copy that could be seen half-written.
    ``tempfile`` would create it with mode 0600, which the rename would
    carry over to ``dest``; created with 0666 instead, the kernel applies
    the umask as for any new file. ``O_EXCL`` makes sure the file is new.
    """
    while True:
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.part"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:  # another download picked the same name
            continue
        return os.fdopen(fd, "wb"), tmp


def _stream(url: str, out: IO[bytes], label: str, progress: bool, timeout: float) -> str:
    """Copy the body of ``url`` into ``out``; return its hex SHA-256."""
    digest = hashlib.sha256()
    try:
        with _opener().open(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                disable=not progress,
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: the server answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"{url}: could not connect ({err.reason})") from None
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(f"{url}: the transfer failed ({err})") from None
    if total is not None and received != total:
        raise DownloadError(f"{url}: received {received:,} of {total:,} bytes")
    return digest.hexdigest()
