"""The page at / in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`) driven by
Selenium loads it, generates, and sees the canvas fill in from the diffusing stream (masked positions first, then
tokens coloured by when they were committed), with the NFE and tokens/s shown."""

import shutil
import time

import pytest
import requests

from tests.serve.conftest import slow_steps

INSTALL = "apt-get install -y chromium chromium-driver"


def chromium_driver():
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the dev extra)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip(f"headless Chromium is not installed: {INSTALL} (as root; CI's .ci/run does it)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = chromium_driver()
    yield driver
    driver.quit()


def test_page_generates_and_the_canvas_fills_in(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: "context 32" in d.find_element(By.ID, "model").text)
    for field, value in (("max_tokens", "12"), ("steps", "12"), ("seed", "3")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "sampler").send_keys("ancestral")
    restore = slow_steps(server.engine, 0.1)  # slow enough to watch the canvas mid-way
    try:
        browser.find_element(By.ID, "generate").click()
        canvas = browser.find_element(By.ID, "canvas")
        wait.until(lambda d: len(canvas.find_elements(By.CSS_SELECTOR, "span.mask")) > 0)
        seen_partial = False
        for _ in range(400):  # while denoising: some positions masked, some committed
            masks = len(canvas.find_elements(By.CSS_SELECTOR, "span.mask"))
            toks = len(canvas.find_elements(By.CSS_SELECTOR, "span.tok"))
            seen_partial |= masks > 0 and toks > 0
            if browser.find_element(By.ID, "status").text == "done":
                break
            time.sleep(0.02)
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
    finally:
        restore()
    assert seen_partial, "the canvas never showed a mix of masked and committed positions"
    spans = canvas.find_elements(By.CSS_SELECTOR, "span.tok, span.mask")
    assert len(spans) == 12 and not canvas.find_elements(By.CSS_SELECTOR, "span.mask")
    colours = {s.value_of_css_property("background-color") for s in spans}
    assert len(colours) > 1  # committed at different steps: different colours
    assert int(browser.find_element(By.ID, "nfe").text) >= 1
    assert float(browser.find_element(By.ID, "tps").text) > 0
    plain = requests.post(server.url + "/v1/completions", json={"prompt": "And the king said unto", "max_tokens": 12,
                                                                "steps": 12, "seed": 3, "sampler": "ancestral"})
    assert browser.find_element(By.ID, "result").get_attribute("textContent") == plain.json()["choices"][0]["text"]


def test_page_edit_mode_rewrites_the_selected_span(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: d.find_element(By.ID, "edit-mode").is_displayed())  # the server has the edit route
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=edit]").click()
    text = "And the king said unto the people"
    box = browser.find_element(By.ID, "edit-text")
    assert box.is_displayed() and not browser.find_element(By.ID, "prompt").is_displayed()
    box.clear()
    box.send_keys(text)
    browser.execute_script("arguments[0].focus(); arguments[0].setSelectionRange(8, 12);", box)  # "king"
    seed = browser.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("1")
    browser.execute_script("arguments[0].setSelectionRange(8, 12);", box)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text == "done")
    expected = requests.post(server.url + "/v1/edits", json={"text": text, "spans": [[8, 12]], "seed": 1,
                                                             "steps": 24}).json()
    result = browser.find_element(By.ID, "result").get_attribute("textContent")
    assert result.startswith(expected["text"]) and ("changed:" in result or "nothing changed" in result)
    canvas = browser.find_element(By.ID, "canvas")
    assert not canvas.find_elements(By.CSS_SELECTOR, "span.mask") and canvas.find_elements(By.CSS_SELECTOR, "span.tok")
