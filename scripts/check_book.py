"""Open the built book in headless Chromium and check what a reader sees.

Run after ``make book``::

    .venv/bin/python scripts/check_book.py [--screenshots DIR]

For each page it loads ``_build/html/<page>.html`` from disk in Chromium,
lets the page's scripts run, and reads the rendered DOM. It checks:

- math is typeset: MathJax replaced the TeX with ``mjx-container`` elements
  and no raw ``$...$`` or ``\\(...\\)`` is left in the text;
- every figure is present: each ``<img>`` points at a file that exists and
  pages that plot show at least one image;
- the training chapter shows its AUC numbers.

Exits 1 with a list of problems if any check fails. Chromium runs with no
network access to anything but the files on disk.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"

# page -> minimum number of figures it must show (pages in _toc.yml are checked)
MIN_FIGURES = {
    "book/intro.html": 0,
    "book/data.html": 0,
    "notebooks/01_data_preparation.html": 1,
    "notebooks/02_gru_from_scratch.html": 1,
    "notebooks/03_attention_and_augru.html": 1,
    "notebooks/04_auxiliary_loss.html": 0,
    "notebooks/05_training_and_evaluation.html": 1,
    "notebooks/06_what_the_model_learned.html": 1,
    "notebooks/07_onnx_export.html": 0,
    "notebooks/08_real_amazon_reviews.html": 1,
    "book/performance.html": 5,
    "book/scale_out.html": 0,
    "book/teaching.html": 0,
    "book/appendix.html": 0,
}
MATH_PAGES = {"book/intro.html", "notebooks/02_gru_from_scratch.html",
              "notebooks/03_attention_and_augru.html", "notebooks/04_auxiliary_loss.html"}
TRAINING_PAGE = "notebooks/05_training_and_evaluation.html"


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def toc_pages() -> list[str]:
    """Every page listed in ``_toc.yml`` (root included), as built HTML paths."""
    names = []
    for line in (ROOT / "_toc.yml").read_text().splitlines():
        m = re.match(r"\s*(?:-\s*)?(?:file|root):\s*(\S+)", line)
        if m:
            names.append(m.group(1) + ".html")
    return names


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("check_book: Chromium not found (Debian package 'chromium')")


def _flags(profile: str) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--allow-file-access-from-files", f"--user-data-dir={profile}",
    ]


def rendered_dom(browser: str, page: Path, profile: str) -> str:
    """The page's DOM after its scripts ran (MathJax included)."""
    done = subprocess.run(
        [browser, *_flags(profile), "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0 or "<html" not in done.stdout:
        raise RuntimeError(f"Chromium could not render {page}: {done.stderr[-500:]}")
    return done.stdout


def screenshot(browser: str, page: Path, out: Path, profile: str) -> None:
    subprocess.run(
        [browser, *_flags(profile), "--virtual-time-budget=15000", "--window-size=1280,2400",
         "--hide-scrollbars", f"--screenshot={out}", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )


def check_page(name: str, dom: str, min_figures: int) -> list[str]:
    problems = []
    main = dom.split('<main', 1)[-1]
    if name in MATH_PAGES:
        if "mjx-container" not in main:
            problems.append(f"{name}: no typeset math (MathJax did not run)")
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style)\b.*?</\1>", " ", main, flags=re.S))
    # prose only: code blocks and inline code may hold dollars and braces legitimately
    prose = re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", main, flags=re.S))
    if re.search(r"\$\$|\\\(|\\\[|\$\\[A-Za-z]", prose):
        problems.append(f"{name}: raw TeX left in the page text")
    if re.search(r"\{glue:|\{include\}|\{doc\}", prose):
        problems.append(f"{name}: an unresolved MyST role or directive in the page text")
    parser = _Images()
    parser.feed(main)
    figures = [s for s in parser.srcs if not s.startswith("data:") and "logo" not in s]
    inline = [s for s in parser.srcs if s.startswith("data:image")]
    for src in figures:
        target = (HTML / name).parent / src.split("#")[0].split("?")[0]
        if not target.is_file():
            problems.append(f"{name}: image {src} is missing")
    if len(figures) + len(inline) < min_figures:
        problems.append(f"{name}: {len(figures) + len(inline)} figure(s), expected >= {min_figures}")
    if name == TRAINING_PAGE and not re.search(r"AUC[^0-9]{0,200}0\.\d{3}", text):
        problems.append(f"{name}: no AUC value shown")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="also write a PNG of each page into this folder")
    args = parser.parse_args(argv)
    if not HTML.is_dir():
        print(f"check_book: {HTML} does not exist; run `make book` first", file=sys.stderr)
        return 1
    browser = chromium()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="check_book_") as profile:
        pages = toc_pages()
        for name in pages:
            min_figures = MIN_FIGURES.get(name, 0)
            page = HTML / name
            if not page.is_file():
                problems.append(f"{name}: page was not built")
                continue
            found = check_page(name, rendered_dom(browser, page, profile), min_figures)
            problems += found
            print(f"{'ok ' if not found else 'BAD'} {name}")
            if args.screenshots is not None:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                screenshot(browser, page, args.screenshots / (page.stem + ".png"), profile)
    if TRAINING_PAGE not in pages:
        problems.append(f"{TRAINING_PAGE}: the training chapter is not in _toc.yml")
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    print(f"{len(pages) - len({p.split(':')[0] for p in problems})} pages ok, "
          f"{len({p.split(':')[0] for p in problems})} with problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
