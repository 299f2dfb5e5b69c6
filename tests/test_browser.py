"""The widgets and tutorials as a person meets them: JupyterLab on a loopback port, in the
system's headless Chromium, driven by Playwright (no browser download).

Opt-in (`pytest --browser`; `.ci/run` runs it): it needs Chromium (Debian's `chromium`)
and the `browser` extra. Screenshots of both widgets and of one figure per tutorial go to
`$TOOLKIT_SCREENSHOTS` (default: a temporary folder, printed); the copies in
`docs/screenshots/` are made by

    TOOLKIT_SCREENSHOTS=docs/screenshots python -m pytest --browser tests/test_browser.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.browser
REPO = Path(__file__).parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
TOKEN = "browser-test-token"
PROMPT = "def mean(values):\\n    "
WIDGETS = [
    "import toolkit as tk\n"
    "llm = tk.load('tiny-code', progress=False, compile=False)\n"
    f"explorer = tk.widgets.explore(llm, '{PROMPT}', n=2, max_tokens=16)\n"
    "explorer",
    f"sweeper = tk.widgets.sweep_explorer(llm, '{PROMPT}', n=4, max_tokens=8)\nsweeper",
    "print('requests:', len(llm.request_log))",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("the browser tests need Chromium: apt-get install chromium")
    return path


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("TOOLKIT_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a folder with the tutorials and a widgets notebook; its base URL."""
    import nbformat

    root = tmp_path_factory.mktemp("lab")           # the repository's layout: the tutorials
    shutil.copytree(NOTEBOOKS[0].parent, root / "notebooks")    # show docs/screenshots
    shutil.copytree(REPO / "docs", root / "docs")
    widgets = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in WIDGETS])
    widgets.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                      "language": "python"}
    nbformat.write(widgets, root / "widgets.ipynb")
    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)                  # no "news?" toast over the screenshots
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port = free_port()
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
               f"--port={port}", f"--IdentityProvider.token={TOKEN}",
               f"--ServerApp.root_dir={root}", f"--LabApp.user_settings_dir={root / '.settings'}",
               f"--LabApp.workspaces_dir={root / '.workspaces'}"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "HF_HUB_OFFLINE": "1"}
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/status?token={TOKEN}").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, \
                (root / "lab.log").read_text()
            time.sleep(0.25)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(),
                                              args=["--no-sandbox"])
        yield chromium
        chromium.close()


class Page:
    """A notebook open in JupyterLab, with the console errors it logs."""

    def __init__(self, browser, lab: str, name: str, shots: Path, width: int = 1280) -> None:
        self.name, self.shots = name, shots
        self.page = browser.new_page(viewport={"width": width, "height": 2400})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text)
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(f"{lab}/lab/tree/{name}?reset&token={TOKEN}")   # this tab only
        self.page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached", timeout=60_000)

    def run(self, index: int) -> None:
        """Run a cell, once its kernel is ready (keys pressed before are lost)."""
        self.page.get_by_text(re.compile(r"\| Idle")).wait_for(timeout=120_000)
        cell = self.page.locator(".jp-Notebook .jp-Cell").nth(index)
        prompt = cell.locator(".jp-InputPrompt")
        before = prompt.inner_text()
        cell.locator(".jp-InputArea-editor").click()
        self.page.keyboard.press("Shift+Enter")
        self.wait_for(lambda: prompt.inner_text() != before, what=f"cell {index} to run")

    def output(self, index: int):
        return self.page.locator(".jp-Notebook .jp-Cell").nth(index).locator(
            ".jp-OutputArea-output")

    def wait_for(self, condition, timeout: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                shot = self.shots / f"failed-{Path(self.name).stem}.png"   # to see why
                self.page.screenshot(path=shot)
                pytest.fail(f"timed out waiting for {what} (the page: {shot})")
            self.page.wait_for_timeout(100)


def _request_count(nb: Page) -> int:
    """The requests the kernel's engine has served so far (from a cell that prints it)."""
    nb.run(2)
    prompt = nb.page.locator(".jp-Notebook .jp-Cell").nth(2).locator(".jp-InputPrompt")
    nb.wait_for(lambda: re.search(r"\[\d+\]", prompt.inner_text()) and nb.output(2).count(),
                what="the request count")
    return int(nb.output(2).inner_text().split()[-1])


def test_widgets_render_and_respond(browser, lab, screenshots):
    nb = Page(browser, lab, "widgets.ipynb", screenshots)
    nb.run(0)
    explorer = nb.output(0)
    completions = explorer.locator(".widget-html-content:has(code)")
    chart = explorer.locator(".widget-image")
    nb.wait_for(lambda: completions.count() and chart.count() and chart.is_visible(),
                timeout=120, what="the explorer")
    labels = explorer.locator(".widget-hslider .widget-label")
    assert labels.count() >= 10
    for k in range(labels.count()):            # whole labels, tooltips that say something
        label = labels.nth(k)
        assert label.evaluate("e => e.scrollWidth <= e.clientWidth"), label.inner_text()
        assert label.get_attribute("title") not in (None, "", "null"), label.inner_text()
    width, natural = chart.evaluate("e => [e.getBoundingClientRect().width, e.naturalWidth]")
    assert abs(width - natural / 2) <= 1                     # its own size, not stretched
    explorer.screenshot(path=screenshots / "explorer.png")

    # a drag re-samples once: new completions; the position slider moves the chart
    requests = _request_count(nb)
    text, image = completions.inner_text(), chart.get_attribute("src")
    handle = explorer.locator(".widget-hslider", has_text="temperature").locator(
        ".noUi-handle")
    box = handle.bounding_box()
    nb.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    nb.page.mouse.down()
    nb.page.mouse.move(box["x"] - 40, box["y"] + box["height"] / 2, steps=8)
    nb.page.mouse.up()
    nb.wait_for(lambda: completions.inner_text() != text, what="new completions")
    assert _request_count(nb) == requests + 1
    explorer.locator(".widget-hslider", has_text="position").locator(".noUi-handle").focus()
    nb.page.keyboard.press("ArrowRight")
    nb.wait_for(lambda: chart.get_attribute("src") != image, what="a new chart")

    # ten arrow-key presses re-sample once, when they stop
    before = _request_count(nb)
    handle.focus()
    for _ in range(10):
        nb.page.keyboard.press("ArrowRight")
        nb.page.wait_for_timeout(60)
    nb.page.wait_for_timeout(2000)
    assert _request_count(nb) == before + 1

    nb.run(1)
    sweeper = nb.output(1)
    nb.wait_for(lambda: sweeper.locator("button").count(), what="the sweep explorer")
    assert not sweeper.locator(".widget-image").is_visible()   # no broken image before a run
    sweeper.locator("button", has_text="run sweep").click()
    nb.wait_for(lambda: sweeper.locator(".widget-image").is_visible(), timeout=120,
                what="the sweep's plot")
    sweeper.screenshot(path=screenshots / "sweep_explorer.png")
    assert nb.errors == []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.stem for n in NOTEBOOKS])
def test_tutorials_render_without_errors(browser, lab, screenshots, notebook):
    nb = Page(browser, lab, f"notebooks/{notebook.name}", screenshots, width=1100)
    figure = nb.page.locator(".jp-RenderedImage img").first
    nb.wait_for(lambda: figure.count() and figure.evaluate("e => e.complete"),
                what="a figure")
    nb.page.wait_for_timeout(1000)             # let the rest of the outputs render
    figure.scroll_into_view_if_needed()
    figure.screenshot(path=screenshots / f"{notebook.stem}.png")
    assert nb.errors == []
