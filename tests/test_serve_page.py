"""The chat page at / driven in headless Chromium (Debian's chromium + chromedriver, through
selenium): it loads offline, streams an answer, shows R1's thinking apart from the answer,
stops a generation, and asks for the API key. Screenshots go to $MLXKT_SCREENSHOT_DIR (or the
test's tmp dir)."""

import os
import shutil
from pathlib import Path

import httpx
import pytest

from test_serve_common import (server, r1_server, MODEL, R1_MODEL, base_state, r1_state, serve, wait_idle,  # noqa: F401
                               with_settings)

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    d = Path(os.environ.get("MLXKT_SCREENSHOT_DIR") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def wait(driver, cond, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: cond(d))


def by_css(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def set_value(driver, element_id, value):
    el = by_css(driver, f"#{element_id}")[0]
    el.clear()
    el.send_keys(str(value))


def open_page(driver, url, model):
    driver.get(url + "/")
    wait(driver, lambda d: by_css(d, "#model-name")[0].text == model)


def ask(driver, text, temperature=0, max_tokens=16):
    from selenium.webdriver.common.keys import Keys

    set_value(driver, "temperature", temperature)
    set_value(driver, "max-tokens", max_tokens)
    before = len(by_css(driver, ".msg.assistant"))
    box = by_css(driver, "#prompt")[0]
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait(driver, lambda d: len(by_css(d, ".msg.assistant")) == before + 1)
    return by_css(driver, ".msg.assistant")[-1]


def finished(driver):
    return driver.find_element("tag name", "body").get_attribute("data-busy") == "0"


def api_answer(url, model, messages, max_tokens=16):
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    return r.json()["choices"][0]["message"]


def test_page_streams_an_answer_offline(browser, server, shots):
    open_page(browser, server.url, MODEL)
    # Everything the page loaded came from this server (no CDN).
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server.url) for u in urls)
    prompt = "def load_model(path):"
    msg = ask(browser, prompt)
    wait(browser, finished)
    content = msg.find_element("css selector", ".content").text
    expected = api_answer(server.url, MODEL, [{"role": "user", "content": prompt}])
    assert content == expected["content"].strip("\n")  # the DOM's innerText drops edge newlines
    assert not msg.find_element("css selector", ".thinking").is_displayed()
    assert "16 tokens" in msg.find_element("css selector", ".stats").text
    # A second turn carries the conversation.
    second = ask(browser, "import os")
    wait(browser, finished)
    assert second.find_element("css selector", ".content").text
    assert len(by_css(browser, ".msg.user")) == 2
    path = shots / "chat_page.png"
    browser.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_shows_thinking_separately(browser, r1_server, shots):
    open_page(browser, r1_server.url, R1_MODEL)
    prompt = "def load_model(path):"
    msg = ask(browser, prompt)
    wait(browser, finished)
    expected = api_answer(r1_server.url, R1_MODEL, [{"role": "user", "content": prompt}])
    think = msg.find_element("css selector", ".thinking")
    assert think.is_displayed()
    assert think.find_element("css selector", ".thinking-text").text == expected["reasoning_content"].strip("\n")
    assert msg.find_element("css selector", ".content").text == expected["content"].strip("\n")
    path = shots / "chat_page_r1_thinking.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 0


def test_page_stop_button_cancels(browser, server):
    open_page(browser, server.url, MODEL)
    msg = ask(browser, "class Model:", temperature=0.7, max_tokens=2000)
    wait(browser, lambda d: msg.find_element("css selector", ".content").text)
    by_css(browser, "#stop")[0].click()
    wait(browser, finished, timeout=10)
    assert msg.find_element("css selector", ".stats").text == "stopped"
    assert wait_idle(server.url, timeout=10)["active"] == 0


def test_page_asks_for_the_api_key(browser, base_state):
    keyed = serve(with_settings(base_state, api_key="page-key"))
    try:
        browser.get(keyed.url + "/")
        wait(browser, lambda d: by_css(d, "#status")[0].text == "API key required")
        set_value(browser, "api-key", "page-key")
        by_css(browser, "#prompt")[0].click()  # blur: the key field's change event fires
        wait(browser, lambda d: by_css(d, "#model-name")[0].text == MODEL)
        msg = ask(browser, "x = 1", max_tokens=4)
        wait(browser, finished)
        assert msg.find_element("css selector", ".content").text
        assert not by_css(browser, ".error")
    finally:
        browser.execute_script("localStorage.clear()")
        keyed.stop()
