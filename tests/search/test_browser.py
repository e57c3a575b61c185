"""End to end: the search page in headless Chromium, against a server running in this process.

The index is built so that the right answer is known: the embedding stored for ``green/0.png`` is the
model's own text embedding of "a bright green ball" (score 1 for that query); the other images get
random unit vectors. The test types the query, checks the grid (paths, order, scores), then clicks a
result and checks the similar-images grid. It needs Debian's ``chromium`` and ``chromium-driver``
(``.ci/run`` installs them) or Google Chrome with a matching ``chromedriver``, and skips otherwise.
"""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

import ldmclip
from ldmclip.search import ExactSearch, SearchEngine, SearchIndex

from .conftest import load, make_images

QUERY = "a bright green ball"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium():
    """A headless Chromium driven by Selenium, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    browser = next((path for path in map(shutil.which, BROWSERS) if path), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no Chromium and chromedriver installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    # An explicit driver path: Selenium would otherwise try to download one.
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def engine(tmp_path, model_name) -> SearchEngine:
    root = make_images(tmp_path / "images")
    paths = [f.path for f in ldmclip.search.find_images(root)]
    model, transform = load(model_name)
    tokenizer = ldmclip.get_tokenizer(model_name)
    embeddings = torch.nn.functional.normalize(torch.randn(len(paths), 64, generator=torch.Generator().manual_seed(0)),
                                               dim=1)
    with torch.no_grad():
        embeddings[paths.index("green/0.png")] = model.encode_text(tokenizer([QUERY]), normalize=True)[0]
    manifest = {"model": {"name": model_name}, "skipped": {}}
    index = SearchIndex(tmp_path / "index", manifest, embeddings, paths, root)
    return SearchEngine(index, model, tokenizer, transform, ExactSearch(embeddings))


@pytest.fixture
def server_url(engine):
    from werkzeug.serving import make_server

    from ldmclip.search.server import create_app

    server = make_server("127.0.0.1", 0, create_app(engine), threaded=True)  # port 0: a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.port}"
    server.shutdown()
    thread.join(timeout=10)


def _grid(browser) -> list[tuple[str, float, bool]]:
    """(path, score, thumbnail loaded) of every card in the result grid, in order."""
    from selenium.webdriver.common.by import By

    cards = []
    for figure in browser.find_elements(By.CSS_SELECTOR, "#results figure.result"):
        image = figure.find_element(By.TAG_NAME, "img")
        loaded = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
        cards.append((figure.find_element(By.CLASS_NAME, "path").text,
                      float(figure.find_element(By.CLASS_NAME, "score").text), loaded))
    return cards


def _expected(engine: SearchEngine, query: torch.Tensor, k: int) -> list[tuple[str, float]]:
    scores = (engine.index.embeddings @ query).tolist()
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    return [(engine.index.paths[i], scores[i]) for i in order]


def test_search_page_in_chromium(engine, server_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chromium()
    try:
        browser.get(server_url + "/")
        assert "8 images" in browser.find_element(By.ID, "about").text
        k = browser.find_element(By.ID, "k")
        k.clear()
        k.send_keys("5")
        browser.find_element(By.ID, "query").send_keys(QUERY, Keys.ENTER)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: "results for" in b.find_element(By.ID, "status").text)
        wait.until(lambda b: all(loaded for _, _, loaded in _grid(b)))  # every thumbnail arrived and decoded

        shown = _grid(browser)
        expected = _expected(engine, engine.index.embeddings[engine.index.paths.index("green/0.png")], 5)
        assert [path for path, _, _ in shown] == [path for path, _ in expected]
        assert shown[0][0] == "green/0.png" and shown[0][1] == 1.0
        for (_, score, _), (_, want) in zip(shown, expected):
            assert score == pytest.approx(want, abs=6e-4)  # shown with 3 decimals
        assert "5 results" in browser.find_element(By.ID, "status").text
        assert "q=a+bright+green+ball" in browser.current_url

        # Click the third result: the grid now shows images like it, itself first with score 1.
        third = shown[2][0]
        browser.find_elements(By.CSS_SELECTOR, "#results figure.result img")[2].click()
        wait.until(lambda b: f"images like {third}" in b.find_element(By.ID, "status").text)
        clicked = _grid(browser)
        expected = _expected(engine, engine.index.embeddings[engine.index.paths.index(third)], 5)
        assert [path for path, _, _ in clicked] == [path for path, _ in expected]
        assert clicked[0][0] == third and clicked[0][1] == 1.0

        # A query with nothing to search shows the server's message instead of results (pasted: a keyboard
        # cannot type control characters).
        box = browser.find_element(By.ID, "query")
        browser.execute_script("arguments[0].value = arguments[1]", box, "\x01\x02")
        box.send_keys(Keys.ENTER)
        wait.until(lambda b: "no words the tokenizer can read" in b.find_element(By.ID, "status").text)
        assert _grid(browser) == []
    finally:
        browser.quit()
