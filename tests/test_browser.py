"""The routing explorer in a real browser: Debian's chromium driven by playwright.

1. The exported page (RoutingExplorer.to_html): its numbers equal Python's, and moving
   top-k and the bias switch changes the colours and loads exactly as Python computes them.
2. JupyterLab on 127.0.0.1: open notebook 02, run it, move the top-k slider, see the
   routing output change.
Screenshots go to a temporary folder; with MINIMOE_SCREENSHOTS=1 in the environment they
replace the committed ones in figures/ (routing_explorer.png is the README's):

    MINIMOE_SCREENSHOTS=1 .venv/bin/pytest -n 0 tests/test_browser.py

Without chromium (or playwright) the tests skip and say why; with CI=true in the
environment a missing browser is a failure.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

import minimoe
from minimoe.widgets import routing_data
from minimoe.widgets.routing import RoutingExplorer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(ROOT, "figures")


def screenshot_path(tmp_path, name: str) -> str:
    """figures/NAME when asked (MINIMOE_SCREENSHOTS=1), else NAME in the test's folder: a test
    run never rewrites a committed figure."""
    folder = FIGURES if os.environ.get("MINIMOE_SCREENSHOTS") == "1" else str(tmp_path)
    return os.path.join(folder, name)


def browser_or_skip():
    """The chromium executable; skip (locally) or fail (CI=true) when it cannot run."""
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        chromium, why = None, "playwright is not installed (pip install -e '.[dev]')"
    else:
        why = "chromium is not installed (Debian: apt-get install -y chromium)"
    if chromium is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests need a browser in CI: {why}")
        pytest.skip(f"browser tests skipped: {why}")
    return chromium


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = browser_or_skip()
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium,
                                              args=["--no-sandbox", "--disable-gpu"])
        yield instance
        instance.close()


def page_state(page):
    """The page's result (its own JSON) and every token's colour, as the reader sees them."""
    result = json.loads(page.text_content(".mm-result"))
    spans = page.eval_on_selector_all(
        ".mm-tok", "els => els.map(e => [e.dataset.layer, Number(e.dataset.expert), "
                   "getComputedStyle(e).backgroundColor])")
    return result, spans


def assert_same_as_python(result, explorer):
    python = explorer.result
    assert result["settings"] == python["settings"]
    for name, ours in python["layers"].items():
        theirs = result["layers"][name]
        assert theirs["experts"] == ours["experts"], name
        assert theirs["kept"] == ours["kept"] and theirs["tokens_per_expert"] == ours["tokens_per_expert"]
        assert max(abs(a - b) for ra, rb in zip(theirs["weights"], ours["weights"])
                   for a, b in zip(ra, rb)) < 1e-12
        assert theirs["max_vio"] == pytest.approx(ours["max_vio"], rel=1e-6)  # balance.py: float32 loads
        assert theirs["dropped_slots"] == ours["dropped_slots"]
        assert theirs["load"] == pytest.approx(ours["load"], abs=1e-7)
        assert result["domains"]["mutual_information"][name] == pytest.approx(
            python["domains"]["mutual_information"][name], rel=1e-9)


def test_exported_page_recomputes_routing_like_python(browser, tmp_path):
    explorer = RoutingExplorer(routing_data.demo_model(), "The cat sat on the mat. def add(a, b): return a + b  12 + 7 = 19")
    path = explorer.to_html(tmp_path / "routing.html")
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(("file:", "blob:"))
               else route.continue_())  # no network: anything else would be a CDN fetch
    page.goto(f"file://{path}")
    page.wait_for_selector("body[data-ready=true]", timeout=20_000)
    result, spans = page_state(page)
    assert_same_as_python(result, explorer)
    tokens = len(explorer.data["tokens"])
    assert len(spans) == 3 * tokens  # one row of tokens per MoE layer
    for i, (layer, expert, _) in enumerate(spans):  # each token's colour is its top-1 expert
        assert expert == explorer.result["layers"][layer]["experts"][i % tokens][0]
    colour_of = {}
    for _, expert, colour in spans:
        assert colour_of.setdefault(expert, colour) == colour
    assert len(set(colour_of.values())) == len(colour_of)  # distinct experts, distinct colours
    page.screenshot(path=screenshot_path(tmp_path, "routing_explorer.png"), full_page=True)

    page.fill("input[data-control=top_k]", "4")  # the top-k slider
    explorer.top_k = 4
    after_k, spans_k = page_state(page)
    assert_same_as_python(after_k, explorer)
    assert after_k["layers"][explorer.layer]["load"] != result["layers"][explorer.layer]["load"]

    page.click("input[data-control=use_bias]")  # the bias switch
    explorer.use_bias = False
    after_bias, spans_bias = page_state(page)
    assert_same_as_python(after_bias, explorer)
    assert [s[2] for s in spans_bias] != [s[2] for s in spans_k]  # some tokens changed colour
    assert after_bias["layers"][explorer.layer]["load"] != after_k["layers"][explorer.layer]["load"]

    page.fill("input[data-control=capacity_factor]", "1")
    explorer.capacity_factor = 1.0
    limited, _ = page_state(page)
    assert_same_as_python(limited, explorer)
    assert limited["layers"][explorer.layer]["dropped_slots"] > 0
    assert "dropped" in page.text_content(".mm-load-note")
    assert errors == []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def jupyterlab(tmp_path):
    """JupyterLab on 127.0.0.1 (free port, no token) serving notebooks/; always stopped."""
    browser_or_skip()
    port = free_port()
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # render every cell (JupyterLab 4 renders only the cells in view by default)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), OMP_NUM_THREADS="1",
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
         f"--ServerApp.root_dir={os.path.join(ROOT, 'notebooks')}",
         "--LabApp.news_url=", "--LabServerApp.extensions_in_dev_mode=False",
         "--ServerApp.shutdown_no_activity_timeout=600", "--MappingKernelManager.cull_idle_timeout=600"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start: " + server.stderr.read().decode()[-2000:])
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server.stderr.close()


def accept_dialog(page) -> bool:
    """Accept an open dialog ("Select Kernel": keep Python 3); True if there was one."""
    accept = page.locator(".jp-Dialog .jp-mod-accept")
    if accept.count():
        accept.first.click()
        return True
    return False


def test_jupyterlab_runs_the_routing_notebook_and_follows_a_slider(browser, jupyterlab, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    messages = []
    page.on("console", lambda message: messages.append(message.text))
    page.goto(f"{jupyterlab}/lab/tree/02_routing_and_balance.ipynb")
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    deadline, calm = time.monotonic() + 90, 0
    while calm < 4 and time.monotonic() < deadline:  # the kernel dialog may come late: accept it
        calm = 0 if accept_dialog(page) else calm + bool(
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count())
        page.wait_for_timeout(500)
    shown = "() => [...document.querySelectorAll('.mm-result')].some(e => e.textContent.length > 0)"
    assert not page.evaluate(shown)  # before running, no explorer: the saved output is not live
    page.locator(".lm-MenuBar").get_by_text("Run", exact=True).click(timeout=10_000)
    page.locator("li[data-command='runmenu:run-all']").click(timeout=10_000)  # Run All Cells
    # the explorer is drawn by the live kernel's widget: wait for it
    deadline, ready = time.monotonic() + 180, False
    while not ready and time.monotonic() < deadline:
        accept_dialog(page)
        ready = page.evaluate(shown)
        page.wait_for_timeout(1000)
    if not ready:
        page.screenshot(path=str(tmp_path / "routing_explorer_jupyterlab_failed.png"))
        raise AssertionError("the explorer did not appear; browser console:\n" + "\n".join(messages[-30:]))
    box = page.locator(".mm-routing").first
    box.scroll_into_view_if_needed()
    before = json.loads(box.locator(".mm-result").text_content())
    k = before["settings"]["top_k"]
    box.locator("input[data-control=top_k]").fill(str(k + 2))
    page.wait_for_function(
        f"() => JSON.parse(document.querySelector('.mm-routing .mm-result').textContent).settings.top_k === {k + 2}",
        timeout=20_000)
    after = json.loads(box.locator(".mm-result").text_content())
    layer = after["layer"]
    assert len(after["layers"][layer]["experts"][0]) == k + 2
    assert after["layers"][layer]["load"] != before["layers"][layer]["load"]
    box.screenshot(path=screenshot_path(tmp_path, "routing_explorer_jupyterlab.png"))
