"""Headless chromium for the tests that look at the built book (Debian's chromium; scripts/test.sh installs it
when run as root, else those tests are skipped with the reason)."""

import asyncio
import html
import json
import re
import shutil
import subprocess
import tempfile
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
out.headlineBottom=h?Math.round(h.getBoundingClientRect().bottom+window.scrollY):null;
document.title='PROBE '+JSON.stringify(out);
"""


def on_phone(page: Path, expression: str, width: int = 390, height: int = 844):
    """Load ``page`` in headless chromium emulating a phone of ``width`` x ``height`` CSS pixels (a headless window
    cannot be narrower than 500 px, so through the DevTools protocol's device metrics) and return the value of the
    JavaScript ``expression`` once the page has loaded."""
    from tornado.httpclient import AsyncHTTPClient
    from tornado.websocket import websocket_connect

    async def run():
        profile = tempfile.mkdtemp()
        proc = subprocess.Popen(
            [chromium(), *CHROMIUM_FLAGS, "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            for _ in range(300):
                if port_file.exists() and port_file.read_text().strip():
                    break
                await asyncio.sleep(0.1)
            port = port_file.read_text().split()[0]
            targets = json.loads((await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/json")).body)
            target = next(t for t in targets if t["type"] == "page")
            ws = await websocket_connect(target["webSocketDebuggerUrl"], max_message_size=2**26)
            ids = iter(range(1, 1_000_000))

            async def call(method, **params):
                i = next(ids)
                await ws.write_message(json.dumps({"id": i, "method": method, "params": params}))
                while (msg := json.loads(await ws.read_message())).get("id") != i:
                    pass
                return msg.get("result", {})

            await call(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=2, mobile=True
            )
            await call("Page.navigate", url=page.as_uri())
            for _ in range(300):
                state = await call("Runtime.evaluate", expression="document.readyState", returnByValue=True)
                if state["result"]["value"] == "complete":
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # images and MathJax settle
            return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")
        finally:
            proc.kill()
            shutil.rmtree(profile, ignore_errors=True)

    return asyncio.run(run())
