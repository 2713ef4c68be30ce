"""Every number of two builds of the book, page by page, side by side: proof that a change of the paper's code
moved no number it did not mean to.

    python scripts/compare_book_numbers.py BEFORE/_build/html AFTER/_build/html

Reads each page's article (the text a reader sees: tags, scripts, styles and inline SVG figures removed), lists its
numbers in reading order, and prints each page whose list differs, with the first differences in context. Exit
status 0 when every page shared by both builds has the same numbers, 1 otherwise; pages found in only one build
are listed too (and count as a difference).
"""

from __future__ import annotations

import argparse
import difflib
import html
import re
import sys
from pathlib import Path

NUMBER = re.compile(r"[-+\u2212]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?%?")
HIDDEN = re.compile(r"<(script|style|svg)\b.*?</\1>", re.S | re.I)


def article_text(page: Path) -> str:
    """The page's article as a reader sees it, whitespace collapsed."""
    source = page.read_text(encoding="utf-8")
    start, end = source.find("<article"), source.rfind("</article>")
    body = source[start:end] if start >= 0 and end > start else source
    text = html.unescape(re.sub(r"<[^>]+>", " ", HIDDEN.sub(" ", body)))
    return re.sub(r"\s+", " ", text).strip()


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def pages(site: Path) -> dict[str, Path]:
    return {str(p.relative_to(site)): p for p in sorted(site.rglob("*.html")) if "_static" not in p.parts}


def compare(before: Path, after: Path, shown: int = 5) -> int:
    old, new = pages(before), pages(after)
    alone = sorted(set(old) ^ set(new))
    for name in alone:
        print(f"{name}: only in {'the first' if name in old else 'the second'} build")
    differing = 0
    for name in sorted(set(old) & set(new)):
        a_text, b_text = article_text(old[name]), article_text(new[name])
        a, b = numbers(a_text), numbers(b_text)
        if a == b:
            continue
        differing += 1
        print(f"{name}: {len(a)} numbers before, {len(b)} after")
        blocks = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
        for tag, i1, i2, j1, j2 in blocks[:shown]:
            print(f"  {tag}: {' '.join(a[i1:i2]) or '-'}  ->  {' '.join(b[j1:j2]) or '-'}")
        if len(blocks) > shown:
            print(f"  ... and {len(blocks) - shown} more")
    shared = len(set(old) & set(new))
    print(f"{shared - differing} of {shared} pages in both builds have identical numbers; {len(alone)} in one only")
    return 1 if differing or alone else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="the first build's HTML folder (e.g. _build/html)")
    parser.add_argument("after", type=Path, help="the second build's HTML folder")
    args = parser.parse_args(argv)
    for folder in (args.before, args.after):
        if not (folder / "book").is_dir():
            parser.error(
                f"{folder}: no book/ inside; give a built site's HTML folder (jupyter-book build . -> _build/html)"
            )
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
