"""websocketd with a real browser: Debian's headless Chromium driven by
Playwright for Python, on both backends. The page is served over
http://127.0.0.1 by websocketd itself and uses its /pyipc.js: echoes of
binary and text messages (0 B, 1 KiB, 1 MiB), typed JSON messages both ways
(pyipc.Registry("json")), the close the page sees when the service stops, and
the chat example between two pages, whose screenshot goes to
docs/images/chat.png (shown by docs/websocket.md).

One browser for the module (starting Chromium is the slow part); each test
opens its own pages. Without Playwright or Chromium the module is skipped,
unless PYIPC_REQUIRE_BROWSER=1 (ci/test sets it): then it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest


from pyipc import EventType, Registry  # noqa: E402

from conftest import CHILD_ENV, ROOT, unavailable  # noqa: E402
from wsd_helpers import DaemonThread, ServiceThread  # noqa: E402

CHROMIUM = os.environ.get("PYIPC_CHROMIUM", "/usr/bin/chromium")
#: Flags for a quiet headless run as root in a container: no sandbox (root),
#: no GPU, and none of the background traffic a fresh profile starts.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "docs" / "images" / "chat.png"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed", "PYIPC_REQUIRE_BROWSER")
    if not os.access(CHROMIUM, os.X_OK):
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)",
                    "PYIPC_REQUIRE_BROWSER")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Site:
    daemon: DaemonThread
    browser: object
    pages: list

    def page(self, path: str = "/"):
        page = self.browser.new_page()
        self.pages.append(page)
        page.set_default_timeout(15_000)
        page.goto(self.daemon.http_url(path))
        return page


@pytest.fixture
def site(browser, backend, rundir):
    """websocketd exposing echo, typed and chat; pages from it."""
    d = DaemonThread(rundir, backend, expose=frozenset({"echo", "typed", "chat"}))
    s = Site(d, browser, [])
    try:
        yield s
    finally:
        for page in s.pages:
            page.close()
        d.stop()


@pytest.fixture
def service(backend, rundir):
    started = []

    def start(name="echo", handle=None):
        s = ServiceThread(rundir, backend, name, handle)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


ECHO_BYTES = """async (size) => {
  const conn = await pyipc.connect("echo");
  const sent = new Uint8Array(size);
  for (let i = 0; i < size; i++) sent[i] = (i * 7 + 3) & 255;
  conn.send(sent);
  const got = await conn.recv();
  await conn.close();
  return got.length === size && got.every((b, i) => b === sent[i]);
}"""

ECHO_TEXT = """async (size) => {
  const conn = await pyipc.connect("echo");
  const text = "aé€😀".repeat(Math.floor(size / 10)) + "a".repeat(size % 10);
  conn.send(text);
  const got = await conn.recvText();
  await conn.close();
  return got === text;
}"""


@pytest.mark.parametrize("size", [0, 1024, 1 << 20])
def test_browser_binary_echo(site, service, size):
    service()
    assert site.page().evaluate(ECHO_BYTES, size) is True


@pytest.mark.parametrize("size", [0, 1024, 1 << 20])
def test_browser_text_echo(site, service, size):
    echo = service()
    assert site.page().evaluate(ECHO_TEXT, size) is True
    # The service got the text's UTF-8 bytes: `size` of them (1 to 4 a character).
    assert echo.messages() == [("aé€😀" * (size // 10) + "a" * (size % 10)).encode()]
    assert len(echo.messages()[0]) == size


# Typed messages: pyipc.Registry("json") on the service's side.
typed = Registry("json")


@typed.register(1)
@dataclass
class Ping:
    seq: int
    note: str = ""


@typed.register(2)
@dataclass
class Pong:
    seq: int
    note: str
    tags: list


def answer_typed(ctx, ev):
    if ev.type == EventType.MESSAGE_RX:
        ping = typed.decode_event(ev, Ping)
        ctx.schedule_typed(ev.fd, Pong(ping.seq + 1, ping.note.upper(), ["π", 2, None]), typed)


TYPED = """async () => {
  const registry = new pyipc.Registry().register(1, "Ping").register(2, "Pong");
  const conn = await pyipc.connect("typed");
  conn.sendTyped(registry.encode("Ping", {seq: 41, note: "héllo"}));
  const answer = registry.decode(await conn.recv());
  await conn.close();
  return answer;
}"""


def test_browser_typed_json_both_ways(site, service):
    peer = service("typed", answer_typed)
    answer = site.page().evaluate(TYPED)
    assert answer == {"type": "Pong", "number": 2,
                      "body": {"seq": 42, "note": "HÉLLO", "tags": ["π", 2, None]}}
    assert typed.decode(peer.messages()[0]) == Ping(41, "héllo")


def test_browser_sees_the_close_when_the_service_stops(site, service):
    echo = service()
    page = site.page()
    page.evaluate("""async () => {
      window.conn = await pyipc.connect("echo");
      conn.send("hi");
      return await conn.recvText();
    }""")
    echo.stop()
    closed = page.evaluate("async () => await conn.closed")
    assert closed == {"code": 1000, "reason": "the service closed the connection",
                      "wasClean": True}


CLIENT_EDGES = """async () => {
  const out = {};
  // A query after the name is kept, not escaped into the name.
  const conn = await pyipc.connect("echo?token=x");
  // Messages buffered before onmessage is set are handed to it first, in order.
  for (const m of ["a", "b"]) conn.send(m);
  await new Promise((resolve) => { const t = () => conn.received.length === 2 ?
      resolve() : setTimeout(t, 5); t(); });
  const seen = [];
  conn.onmessage = (bytes) => seen.push(new TextDecoder().decode(bytes));
  out.buffered = seen.slice();
  // A recv() waiting is served before onmessage.
  conn.onmessage = null;
  const waiting = conn.recv();
  conn.onmessage = (bytes) => seen.push("late:" + new TextDecoder().decode(bytes));
  conn.send("c");
  out.waited = new TextDecoder().decode(await waiting);
  try { conn.sendTyped("Ping", {}); } catch (e) { out.typedName = e.name; }
  // An onclose that throws does not leave `closed` pending.
  conn.onclose = () => { throw new Error("a careless handler"); };
  out.closed = (await conn.close()).code;
  try { conn.send("after"); } catch (e) { out.afterClose = e.message; }
  return out;
}"""


THROWING_HANDLER = """async () => {
  const conn = await pyipc.connect("echo");
  for (const m of ["a", "b", "c"]) conn.send(m);
  await new Promise((resolve) => { const t = () => conn.received.length === 3 ?
      resolve() : setTimeout(t, 5); t(); });
  const seen = [];
  try {
    conn.onmessage = (bytes) => {
      const text = new TextDecoder().decode(bytes);
      if (text === "a") throw new Error("a careless handler");
      seen.push(text);
    };
  } catch (e) { seen.push("threw"); }
  conn.send("d");
  const end = Date.now() + 5000;       // what came by then (a stranded one never does)
  await new Promise((resolve) => { const t = () => seen.length === 4 || Date.now() > end ?
      resolve() : setTimeout(t, 5); t(); });
  await conn.close();
  return seen;
}"""


def test_browser_messages_stay_in_order_after_a_handler_threw(site, service):
    """A handler that throws while the buffered messages are handed to it:
    the rest stay buffered and come before later ones (a later message
    overtook them, and they were stranded)."""
    service()
    assert site.page().evaluate(THROWING_HANDLER) == ["threw", "b", "c", "d"]


NOT_READ = """async () => {
  const conn = await pyipc.connect("echo", {maxBuffered: 1200});
  const sent = [];
  for (let i = 0; i < 10; i++) {
    const m = new Uint8Array(300).fill(i);
    sent.push(m);
    conn.send(m);
  }
  const closed = await conn.closed;         // nothing taken: past 1200 bytes, closed
  const taken = [];
  for (;;) {
    try { taken.push(await conn.recv()); } catch (e) { taken.push(e.code); break; }
  }
  const end = taken.pop();
  return {code: closed.code, reason: closed.reason, end: end, count: taken.length,
          inOrder: taken.every((m, i) => m.length === 300 && m.every((b) => b === i))};
}"""


def test_browser_a_page_that_does_not_read_is_closed_past_max_buffered(site, service):
    """pyipc.js's bound on what a page has not taken: past maxBuffered the
    WebSocket is closed (4001) and the service sees its connection end;
    what was buffered is still taken, whole and in order, then recv()
    rejects. (It grew without bound.)"""
    echo = service()
    got = site.page().evaluate(NOT_READ)
    assert got["code"] == 4001 and got["end"] == 4001
    assert got["reason"] == "more than 1200 bytes received and not taken (maxBuffered)"
    assert 5 <= got["count"] <= 10 and got["inOrder"]   # 4 are at the bound; the 5th closed it
    echo.wait_for(lambda evs: any(ev.type == EventType.DISCONNECTION for ev in evs))


def test_browser_client_edges(site, service):
    """pyipc.js: connect() keeps a query; setting onmessage hands it what was
    buffered (it stayed in the buffer); a waiting recv() is served first (it
    never settled); sendTyped with a name says what to do; a throwing onclose
    leaves close() settled (it hung); send after the end says closed."""
    echo = service()
    page = site.page()
    page.on("pageerror", lambda e: None)         # the careless onclose's throw
    assert page.evaluate(CLIENT_EDGES) == {
        "buffered": ["a", "b"], "waited": "c", "typedName": "TypeError", "closed": 1000,
        "afterClose": "connection closed (1000 closed)"}
    assert echo.messages() == [b"a", b"b", b"c"]


@pytest.fixture
def chat(backend, rundir):
    """examples/chat_service.py, running (ended at the end of the test)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "chat_service.py"),
                             "--rundir", rundir, "--backend", backend],
                            env=CHILD_ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert "ready" in proc.stdout.readline()
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_browser_chat_between_two_pages(site, backend, chat):
    ada, bob = site.page("/chat.html"), site.page("/chat.html")
    join(ada, "ada")
    join(bob, "bob")
    ada.get_by_text("* bob joined").wait_for()
    say(ada, "hello bob, this is ada")
    bob.get_by_text("ada: hello bob, this is ada").wait_for()
    say(bob, "hi ada! seen through websocketd")
    ada.get_by_text("bob: hi ada! seen through websocketd").wait_for()
    assert "members: ada, bob" in bob.text_content("#status")
    assert "members: ada, bob" in ada.text_content("#status")
    if backend == "native":          # one picture per run
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        ada.set_viewport_size({"width": 720, "height": 420})
        ada.screenshot(path=str(SCREENSHOT))
        assert SCREENSHOT.stat().st_size > 5000


def test_browser_chat_join_twice_then_rejoin(site, chat):
    """chat.html: a second submit while joining makes no second connection
    (it left a ghost member and a stuck page); after the connection ends the
    join form is back (it stayed hidden: no way to rejoin but a reload)."""
    ada, bob = site.page("/chat.html"), site.page("/chat.html")
    ada.fill("#name", "ada")
    ada.evaluate("() => { const f = document.getElementById('join');"
                 " f.requestSubmit(); f.requestSubmit(); }")
    ada.get_by_text("(joined as ada").wait_for()
    join(bob, "bob")
    bob.get_by_text("(joined as bob; members: ada, bob)").wait_for()
    assert ada.locator("#status").text_content() == "(joined as ada; members: ada, bob)"
    ada.evaluate("async () => await conn.close()")
    bob.get_by_text("* ada left").wait_for()
    assert bob.locator("#status").text_content() == "(joined as bob; members: bob)"
    assert ada.locator("#join").is_visible()
    join(ada, "ada")                        # again, without a reload
    bob.get_by_text("* ada joined").wait_for()


def join(page, name):
    page.fill("#name", name)
    page.click("#join button")
    page.get_by_text(f"(joined as {name}").wait_for()


def say(page, text):
    page.fill("#text", text)
    page.click("#say button")
