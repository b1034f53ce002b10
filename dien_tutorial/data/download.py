"""Fetch data files over HTTP(S), safely and only when needed.

:func:`download` streams a URL into a temporary file next to the
destination, checks its SHA-256 when one is given, and only then renames it
into place. A failed or interrupted download therefore never leaves a
half-written file under the final name, and a file that is already there
with the right checksum is not fetched again.

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
import tempfile
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


class DownloadError(RuntimeError):
    """A download failed: HTTP error, network error, or wrong checksum."""


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
        dest: the file to write; its folder is created if needed.
        sha256: expected hex digest of the file, or ``None`` to skip the check.
        progress: show a tqdm progress bar (on stderr).
        timeout: seconds to wait for the server on each network operation.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the URL is not HTTP(S).
        DownloadError: the server answered with an error, the connection
            failed or ended early, or the checksum did not match (the
            message names the file and both digests). In every case
            ``dest`` is left as it was and no temporary file remains.
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme
    # urllib also opens file:, ftp: and data: URLs; a data download should
    # not quietly read a local file because of a typo in a config.
    if scheme not in ("http", "https"):
        raise ValueError(f"{url}: only http:// and https:// URLs are downloaded")
    expected = sha256.lower() if sha256 else None

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
    # Same folder as dest, so the final os.replace is a rename on one file
    # system: atomic, never a copy that could be seen half-written.
    handle = tempfile.NamedTemporaryFile(
        dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False
    )
    tmp = Path(handle.name)
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


def _stream(url: str, out: IO[bytes], label: str, progress: bool, timeout: float) -> str:
    """Copy the body of ``url`` into ``out``; return its hex SHA-256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
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
