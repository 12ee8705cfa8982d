"""The shipped workflows in ComfyUI's own editor, in headless Chromium (selenium, driving the installed
chromium and chromedriver: nothing is downloaded). Each editor-format workflow under workflows/ is opened in
a real ComfyUI page (tests/comfy_server.py: the pack on tiny random models) and checked as a user meets it:
no missing-node warning and no page error from the pack; every node with its widgets; the prompt the page
builds (``app.graphToPrompt()``) equal to the workflow's API twin; queued from the page, it finishes and the
nodes show their outputs (images, the caption); no two nodes overlap, before or after the run; no node title
is cut. A screenshot of each workflow after its run is saved (PNG) into $BROWSER_SCREENSHOTS, by default a
folder under pytest's temporary directory; the paths are printed.

Skipped (with the reason) where there is no ComfyUI checkout with a .venv at ${COMFYUI_PATH:-$HOME/ComfyUI},
or no chromium and chromedriver (Debian: apt-get install chromium chromium-driver)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import JavascriptException, WebDriverException
from selenium.webdriver.chrome.service import Service

from .comfy_server import REPO, Server, missing_comfyui, prepare_base

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
WINDOW = (2560, 1440)
# what ties a page error to this pack: its node ids (all QwenLayered...), its folder in custom_nodes (the URL of
# any JavaScript it serves, /extensions/qwen_image_layered/...) and its name
PACK_PATTERN = re.compile(r"QwenLayered|qwen_image_layered|Qwen-Image-Layered", re.IGNORECASE)
# nodes that show their text on the node after a run ({"text": [value]} in `executed`, as ui.PreviewText sends it)
TEXT_NODES = {"QwenLayeredCaption", "QwenLayeredImageToLayers", "QwenLayeredSavePSD", "QwenLayeredSaveLayerPNGs"}
# the samplers' step count for the run from the page, as tests/test_comfyui.py runs them: the prompt is
# compared with the API twin before this change
FAST_STEPS = 2
RUN_TIMEOUT = 300  # seconds for one workflow's run

if missing_comfyui():
    pytest.skip(missing_comfyui(), allow_module_level=True)
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )


def _format(data) -> str | None:
    """'editor' for the litegraph format (nodes and links), 'api' for POST /prompt's {id: {class_type,
    inputs}}, None for any other JSON."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        return "editor"
    if data and isinstance(data, dict) and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return "api"
    return None


def workflow_files() -> dict[str, dict[str, Path]]:
    """Every JSON file under workflows/ (recursively) by its format, paired by name with the ``.ui`` or
    ``.api`` of its stem stripped: ``X.ui.json`` + ``X.api.json`` and ``X.json`` + ``api/X.json`` both give
    {"X": {"editor": ..., "api": ...}}. Two files of one format under one name is an error."""
    pairs: dict[str, dict[str, Path]] = {}
    for path in sorted((REPO / "workflows").rglob("*.json")):
        kind = _format(json.loads(path.read_text()))
        if kind is None:
            continue
        name = path.name.removesuffix(".json").removesuffix(".ui").removesuffix(".api")
        if kind in pairs.setdefault(name, {}):
            raise ValueError(f"two {kind}-format workflows named {name!r}: {pairs[name][kind]} and {path}")
        pairs[name][kind] = path
    return pairs


def _ui_from_api():
    spec = importlib.util.spec_from_file_location("ui_from_api", REPO / "workflows" / "ui_from_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


UI_FROM_API = _ui_from_api()
WORKFLOWS = {name: files for name, files in workflow_files().items() if "editor" in files}
TEXT_WORKFLOWS = [
    name
    for name, files in WORKFLOWS.items()
    if TEXT_NODES & {node["type"] for node in json.loads(files["editor"].read_text())["nodes"]}
]

# installed before the page's own scripts run: its uncaught errors and unhandled promise rejections
PAGE_HOOKS = """
window.__pageErrors = [];
window.addEventListener('error', e => window.__pageErrors.push(
    {kind: 'error', message: String(e.message), source: `${e.filename}:${e.lineno}`,
     stack: String(e.error?.stack ?? '')}));
window.addEventListener('unhandledrejection', e => window.__pageErrors.push(
    {kind: 'unhandledrejection', message: String(e.reason?.message ?? e.reason), source: '',
     stack: String(e.reason?.stack ?? '')}));
"""

READY = """
return !!(window.app?.canvas && window.comfyAPI?.api?.api && window.LiteGraph
          && 'LoadImage' in LiteGraph.registered_node_types && app.graph?.nodes.length > 0)
"""

# the workflow opened as the editor opens a file; the ids of the prompts the server then starts, as the page
# hears of them
LOAD = """
const [workflow, name, done] = arguments;
window.__started = [];
window.comfyAPI.api.api.addEventListener('execution_start', e => window.__started.push(e.detail.prompt_id));
const unregistered = workflow.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
app.loadGraphData(workflow, true, true, name).then(
    () => done({unregistered}), e => done({error: String(e.stack ?? e)}));
"""

# every node as the page holds it: its rectangle with the title bar (LGraphNode.measure), its widgets, the
# width of its title against the width the frontend gives it (LGraphNode.drawTitleText: the node's width less
# a title height each side and the title buttons; wider titles are cut with an ellipsis), its images
NODES = """
const done = arguments[0];
const fonts = [...new Set(app.graph.nodes.map(n => n.titleFontStyle))];
Promise.all(fonts.map(f => document.fonts.load(f))).then(() => {
    const ctx = document.createElement('canvas').getContext('2d');
    done(app.graph.nodes.map(node => {
        const rect = [0, 0, 0, 0];
        node.measure(rect);
        ctx.font = node.titleFontStyle;
        const title = String(node.getTitle() ?? '') + (node.pinned ? '📌' : '');
        const titleWidth = ctx.measureText(title).width;
        let titleSpace = node.renderingSize[0] - LiteGraph.NODE_TITLE_HEIGHT * 2;
        let buttons = 0;
        for (const button of node.title_buttons ?? []) if (button.visible) buttons += button.getWidth(ctx) + 2;
        if (buttons > 0) titleSpace -= buttons - 20;
        return {
            id: String(node.id), type: node.type, title, titleWidth, titleSpace, rect: Array.from(rect),
            collapsed: !!node.flags?.collapsed,
            widgets: (node.widgets ?? []).map(w => ({
                name: w.name, value: typeof w.value === 'object' ? null : w.value,
                options: Array.isArray(w.options?.values) ? w.options.values : null})),
            images: (node.imgs ?? []).map(img => ({src: img.src, loaded: img.complete && img.naturalWidth > 0})),
        };
    }));
}, e => done({error: String(e)}));
"""

DIALOGS = """
return [...document.querySelectorAll('[role=dialog], [role=alertdialog], .p-dialog, [data-testid=error-overlay]')]
    .filter(e => e.getClientRects().length > 0).map(e => e.innerText.trim().slice(0, 500));
"""

PROMPT = """
const done = arguments[0];
app.graphToPrompt().then(p => done(p.output), e => done({error: String(e.stack ?? e)}));
"""

SET_STEPS = """
for (const node of app.graph.nodes)
    for (const w of node.widgets ?? []) if (w.name === 'steps') w.value = arguments[0];
"""

QUEUE = """
const done = arguments[0];
app.queuePrompt(0).then(
    ok => done({ok, nodeErrors: app.lastNodeErrors ?? null}), e => done({ok: false, error: String(e)}));
"""

# the whole graph in view, as the editor's "fit view" does
FIT_VIEW = """
const rects = app.graph.nodes.map(n => { const r = [0, 0, 0, 0]; n.measure(r); return r; });
const left = Math.min(...rects.map(r => r[0])), top = Math.min(...rects.map(r => r[1]));
const right = Math.max(...rects.map(r => r[0] + r[2])), bottom = Math.max(...rects.map(r => r[1] + r[3]));
app.canvas.ds.fitToBounds([left, top, right - left, bottom - top]);
app.canvas.setDirty(true, true);
"""


@dataclass
class Observed:
    """What the page showed of one workflow, before and after its run from the page."""

    editor: dict
    api: dict | None
    unregistered: list[str] = field(default_factory=list)
    load_error: str | None = None
    dialogs: list[str] = field(default_factory=list)
    before: list[dict] = field(default_factory=list)
    prompt: dict | None = None
    queued: dict | None = None
    history: dict | None = None
    after: list[dict] = field(default_factory=list)
    dialogs_after: list[str] = field(default_factory=list)
    page_errors: list[dict] = field(default_factory=list)
    console: list[dict] = field(default_factory=list)
    screenshot: Path | None = None
    problem: str | None = None  # why the run's part of the observation stopped early


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_browser")
    prepare_base(base)
    # a returning user's settings: no first-run template browser over the graph; for the screenshots, no
    # minimap over its corner and the nodes' text drawn at any zoom (no simplified rendering when zoomed out)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(
        json.dumps(
            {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
        )
    )
    running = Server(base)
    yield running
    running.stop()
    shutil.rmtree(base / "custom_nodes", ignore_errors=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # the page asks api.comfy.org for releases: no host but the local server resolves, so nothing leaves
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # a driver path given: selenium-manager is not asked to find (or download) anything
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PAGE_HOOKS})
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("BROWSER_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def object_info(comfy) -> dict:
    return comfy.get("/object_info")


@pytest.fixture(scope="module")
def observe(comfy, browser, screenshots):
    """observe(name): the workflow opened, checked and run in the page once, what it showed kept for every
    test of that workflow."""
    seen: dict[str, Observed] = {}

    def observe(name: str) -> Observed:
        if name not in seen:
            seen[name] = _observe(comfy, browser, name, screenshots / f"{name}.png")
        return seen[name]

    return observe


def _wait(driver, script: str, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = driver.execute_script(script)
        except JavascriptException:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"{what}: not in {timeout} s")


def _observe(comfy: Server, driver, name: str, screenshot: Path) -> Observed:
    files = WORKFLOWS[name]
    seen = Observed(
        editor=json.loads(files["editor"].read_text()),
        api=json.loads(files["api"].read_text()) if "api" in files else None,
    )
    # a page of the server's origin without the editor, to clear what the last workflow's page stored (its
    # open tabs and drafts, which the editor would restore): each workflow opens in a page of its own
    driver.get(f"{comfy.url}/system_stats")
    driver.execute_script("localStorage.clear(); sessionStorage.clear()")
    driver.get_log("browser")  # what the last page left
    driver.get(comfy.url)
    try:
        _wait(driver, READY, 60, "the ComfyUI page ready (app set up, node types registered, the graph loaded)")
        loaded = driver.execute_async_script(LOAD, seen.editor, name)
        seen.unregistered, seen.load_error = loaded.get("unregistered", []), loaded.get("error")
        time.sleep(1)  # the warnings the load raises are shown from promises after it
        seen.dialogs = driver.execute_script(DIALOGS)
        seen.before = _nodes(driver)
        seen.prompt = driver.execute_async_script(PROMPT)
        _run(comfy, driver, seen)
    except (TimeoutError, WebDriverException, AssertionError) as error:
        seen.problem = f"{type(error).__name__}: {error}"
    try:
        driver.execute_script(FIT_VIEW)
        time.sleep(0.5)
    except WebDriverException as error:  # no graph to fit: the screenshot shows the page as it is
        seen.problem = seen.problem or f"{type(error).__name__}: {error}"
    driver.save_screenshot(str(screenshot))
    seen.screenshot = screenshot
    seen.page_errors = driver.execute_script("return window.__pageErrors ?? []")
    seen.console = driver.get_log("browser")
    return seen


def _nodes(driver) -> list[dict]:
    nodes = driver.execute_async_script(NODES)
    assert isinstance(nodes, list), nodes
    return nodes


def _run(comfy: Server, driver, seen: Observed) -> None:
    """Queued from the page (the samplers at FAST_STEPS), the server's history polled until it has finished,
    then the page given until its images are loaded and its node sizes settle."""
    driver.execute_script(SET_STEPS, FAST_STEPS)
    seen.queued = driver.execute_async_script(QUEUE)
    assert seen.queued.get("ok"), f"the page did not queue the workflow: {seen.queued}"
    started = _wait(driver, "return window.__started[0]", 60, "the queued prompt's execution_start")
    seen.history = comfy.wait_for(started, RUN_TIMEOUT)
    expected = {node: len(out.get("images", [])) for node, out in seen.history.get("outputs", {}).items()}
    deadline = time.monotonic() + 60
    previous = None
    while time.monotonic() < deadline:
        driver.execute_script(FIT_VIEW)  # a node's images are loaded and sized when it is drawn
        time.sleep(0.5)
        nodes = _nodes(driver)
        shown = {n["id"]: sum(image["loaded"] for image in n["images"]) for n in nodes}
        sizes = [n["rect"] for n in nodes]
        if all(shown.get(node, 0) >= count for node, count in expected.items()) and sizes == previous:
            break
        previous = sizes
    seen.after = nodes
    seen.dialogs_after = driver.execute_script(DIALOGS)


def _needs_run(seen: Observed) -> None:
    if seen.history is None:
        pytest.fail(f"the workflow did not run from the page: {seen.problem or seen.queued}")


def _overlaps(nodes: list[dict]) -> list[str]:
    """Each pair of nodes whose rectangles (title bar included) overlap, with the overlap's size."""
    found = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["rect"], b["rect"]
            width, height = min(ax + aw, bx + bw) - max(ax, bx), min(ay + ah, by + bh) - max(ay, by)
            if width > 0 and height > 0:
                found.append(
                    f"{a['id']} {a['title']!r} {[round(v) for v in a['rect']]} and {b['id']} {b['title']!r} "
                    f"{[round(v) for v in b['rect']]}: {width:.0f} x {height:.0f} px"
                )
    return found


def _widget_inputs(schema: dict) -> list[str]:
    """The inputs of a node type that the editor shows as widgets, by the rule of workflows/ui_from_api.py
    (which writes the editor files' widget values)."""
    inputs = {**schema["input"].get("required", {}), **schema["input"].get("optional", {})}
    return [name for name, spec in inputs.items() if UI_FROM_API._is_widget(spec)]


def _by_id(nodes: list[dict]) -> dict[str, dict]:
    return {node["id"]: node for node in nodes}


def _pack_errors(seen: Observed) -> tuple[list[str], list[str]]:
    """The page's uncaught errors, unhandled rejections and error-level console messages: (those that name
    the pack, the rest)."""
    lines = [f"{e['kind']}: {e['message']} {e['source']} {e['stack']}".strip() for e in seen.page_errors]
    lines += [f"console: {entry['message']}" for entry in seen.console if entry["level"] == "SEVERE"]
    ours = [line for line in lines if PACK_PATTERN.search(line)]
    return ours, [line for line in lines if line not in ours]


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_screenshot_after_the_run(observe, capsys, name):
    seen = observe(name)
    with capsys.disabled():
        print(f"\nscreenshot of {name}: {seen.screenshot}")
    assert seen.screenshot.stat().st_size > 0


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_opens_without_missing_nodes_or_warnings(observe, name):
    seen = observe(name)
    assert seen.load_error is None, seen.load_error
    assert seen.before, seen.problem
    assert not seen.unregistered, f"node types the page does not know: {seen.unregistered}"
    assert not seen.dialogs, f"the page shows a dialog or warning after loading: {seen.dialogs}"


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_no_page_error_from_the_pack(observe, capsys, name):
    seen = observe(name)
    ours, noise = _pack_errors(seen)
    if noise:
        with capsys.disabled():
            print(f"\npage messages of {name} not from the pack (not failed on):")
            for line in dict.fromkeys(noise):
                print(f"  {line[:300]}")
    assert not ours, "\n".join(ours)


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_every_node_has_its_widgets(observe, object_info, name):
    """Each node of the file is on the page, as its own type, with a widget for every widget input its type
    declares; a combo's value is one of its options (a model or image the server has)."""
    seen = observe(name)
    page = _by_id(seen.before)
    assert page, seen.problem
    problems = []
    for node in seen.editor["nodes"]:
        shown = page.get(str(node["id"]))
        if shown is None or shown["type"] != node["type"]:
            problems.append(f"node {node['id']} ({node['type']}) is not on the page: {shown}")
            continue
        widgets = {w["name"]: w for w in shown["widgets"]}
        for input_name in _widget_inputs(object_info[node["type"]]):
            widget = widgets.get(input_name)
            if widget is None:
                problems.append(f"node {node['id']} ({node['type']}) has no widget {input_name!r}")
            elif widget["options"] is not None and widget["value"] not in widget["options"]:
                problems.append(
                    f"node {node['id']} ({node['type']}) {input_name}={widget['value']!r} is none of "
                    f"{widget['options']}"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_page_prompt_is_the_api_twin(observe, name):
    """app.graphToPrompt()'s output (what Run sends to POST /prompt) equals the API file, node by node: class
    and inputs, links as [node id, output slot]. Only ``_meta`` (the node's title, which the server ignores) is
    left out. Widgets the editor adds (the seed's control_after_generate, LoadImage's upload button) are not
    serialised into the prompt, so they need no normalising; numbers compare by value (4 equals 4.0)."""
    seen = observe(name)
    assert seen.api is not None, f"no API-format twin of {WORKFLOWS[name]['editor']} under workflows/"
    assert isinstance(seen.prompt, dict) and "error" not in seen.prompt, seen.prompt or seen.problem
    page = {node_id: (node["class_type"], node["inputs"]) for node_id, node in seen.prompt.items()}
    api = {node_id: (node["class_type"], node["inputs"]) for node_id, node in seen.api.items()}
    assert page == api


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_run_from_the_page_finishes_and_shows_the_images(observe, name):
    """Queued from the page, the prompt finishes without an error, and every node with image outputs (the
    save nodes' layer previews and layers) shows all its images, loaded."""
    seen = observe(name)
    _needs_run(seen)
    status = seen.history["status"]
    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
    assert status["status_str"] == "success" and status["completed"], errors
    assert not seen.dialogs_after, f"the page shows a dialog or error after the run: {seen.dialogs_after}"
    page = _by_id(seen.after)
    with_images = {node: out["images"] for node, out in seen.history["outputs"].items() if out.get("images")}
    assert with_images, f"no node of {name} output an image: {seen.history['outputs']}"
    for node, images in with_images.items():
        shown = page[node]["images"]
        assert len(shown) == len(images) and all(image["loaded"] for image in shown), (node, images, shown)
        for image, img in zip(images, shown, strict=True):
            assert f"filename={image['filename']}" in img["src"], (image, img["src"])


@pytest.mark.parametrize("name", TEXT_WORKFLOWS)
def test_text_is_shown_on_the_node(observe, object_info, name):
    """Auto-caption and Image to Layers (the caption, the prompt used) and the save nodes (the file written) send
    their text ({"text": [...]} in their executed output) and the page shows it on the node, in a widget of its
    own (not one of the node's inputs)."""
    seen = observe(name)
    _needs_run(seen)
    page = _by_id(seen.after)
    problems = []
    for node in seen.editor["nodes"]:
        if node["type"] not in TEXT_NODES:
            continue
        node_id = str(node["id"])
        texts = seen.history["outputs"].get(node_id, {}).get("text")
        if not texts or not all(isinstance(text, str) and text.strip() for text in texts):
            problems.append(f"node {node_id} ({node['type']}) sent no text in its output: {texts!r:.200}")
            continue
        schema = object_info[node["type"]]["input"]
        inputs = {*schema.get("required", {}), *schema.get("optional", {})}
        shown = [
            w["value"] for w in page[node_id]["widgets"] if w["name"] not in inputs and isinstance(w["value"], str)
        ]
        missing = [text for text in texts if not any(text in value for value in shown)]
        if missing:
            problems.append(
                f"node {node_id} ({node['type']}) does not show its text {missing!r:.200}; the values of its "
                f"widgets other than its inputs: {shown!r:.200}"
            )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_no_nodes_overlap_when_opened(observe, name):
    seen = observe(name)
    assert seen.before, seen.problem
    overlaps = _overlaps(seen.before)
    assert not overlaps, "\n".join(overlaps)


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_no_nodes_overlap_after_the_run(observe, name):
    """After the run the save nodes have grown by their preview image: the nodes below must still be clear."""
    seen = observe(name)
    _needs_run(seen)
    overlaps = _overlaps(seen.after)
    assert not overlaps, "\n".join(overlaps)


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_no_node_title_is_cut(observe, name):
    seen = observe(name)
    assert seen.before, seen.problem
    cut = [
        f"{n['id']} {n['title']!r}: {n['titleWidth']:.0f} px of title in {n['titleSpace']:.0f} px"
        for n in seen.before
        if not n["collapsed"] and n["titleWidth"] > n["titleSpace"]
    ]
    assert not cut, "titles cut with an ellipsis (the node is too narrow):\n" + "\n".join(cut)
