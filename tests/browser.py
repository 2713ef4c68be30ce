"""Headless chromium for the tests that look at the built book (Debian's chromium; scripts/test.sh installs it
when run as root, else those tests are skipped with the reason)."""

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="Debian's chromium is not installed (scripts/test.sh installs it when run as root)"
)


def probe(site: Path, page: str, script: str, tmp_path: Path, width: int = 1280) -> str:
    """Load ``page`` in headless chromium with ``script`` run after load; returns the title it sets."""
    source = site / page
    probe = source.with_name("_probe_" + source.name)
    probe.write_text(
        source.read_text().replace(
            "</body>", f"<script>window.addEventListener('load',()=>{{{script}}});</script></body>"
        )
    )
    try:
        dom = subprocess.run(
            [
                chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                f"--window-size={width},2000",
                "--virtual-time-budget=10000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    finally:
        probe.unlink(missing_ok=True)
    title = re.search(r"<title>PROBE ([^<]*)</title>", dom)
    assert title, dom[:500]
    return html.unescape(title.group(1))


# After load: the page's width problems at the window's width, as JSON: the document wider than the window, tables,
# figures and images reaching past the article column unclipped, and (``scrolling``) tables that scroll sideways in
# their container; then the images that failed to load, and whether the headline figure is there and loaded.
LAYOUT_SCRIPT = """
const art=document.querySelector('main article')||document.querySelector('article');const a=art.getBoundingClientRect();
const out={page:document.documentElement.scrollWidth-window.innerWidth,wide:[],scrolling:[],broken:[],headline:false};
const clipped=e=>{for(let c=e.parentElement;c&&c!==art;c=c.parentElement){
  if(['auto','scroll','hidden'].includes(getComputedStyle(c).overflowX))return true;}return false;};
art.querySelectorAll('table,img,svg,figure').forEach(e=>{const r=e.getBoundingClientRect();
  if(r.width>0&&!e.closest('mjx-container')&&!clipped(e)&&r.right>a.right+2)\
out.wide.push(e.tagName+' '+Math.round(r.width)+'px');});
art.querySelectorAll('table').forEach(t=>{let c=t.parentElement;
  while(c&&c!==art){if(c.scrollWidth>c.clientWidth+2&&['auto','scroll'].includes(getComputedStyle(c).overflowX)){
    out.scrolling.push((t.textContent.trim().slice(0,40))+' '+c.scrollWidth+'/'+c.clientWidth+'px');break;}\
c=c.parentElement;}});
out.broken=[...document.images].filter(i=>!(i.complete&&i.naturalWidth>0)).map(i=>i.src);
const h=document.querySelector('#headline-figure img');out.headline=!!(h&&h.complete&&h.naturalWidth>0);
document.title='PROBE '+JSON.stringify(out);
"""
