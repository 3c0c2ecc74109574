"""The sampler page in a real browser: headless Chromium driven by Selenium through the system chromedriver
(Debian: `apt-get install -y chromium chromium-driver`; nothing is downloaded). Skipped when either is missing.

`BAR_APP_SCREENSHOT=docs/app.png` also saves a screenshot of a guidance grid, made with the demo's checkpoints when
`make demo` has written them (outputs/demo), else with the tiny test models.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .app_helpers import ROOT, serving

pytestmark = pytest.mark.browser

selenium = pytest.importorskip("selenium", reason="pip install selenium (the app extra) to drive the browser")

from selenium import webdriver  # noqa: E402 - after the skip above
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
if BROWSER is None or DRIVER is None:
    pytest.skip("no Chromium with chromedriver (apt-get install -y chromium chromium-driver)", allow_module_level=True)

DEMO = ROOT / "outputs" / "demo"
DEMO_CHECKPOINTS = (DEMO / "generator" / "checkpoints" / "last.ckpt", DEMO / "tokenizer" / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def browser():
    # Selenium Manager would look for a browser or a driver online: the system's are named, offline.
    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,860", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(generator_of_tiny_tokenizer, tokenizer_checkpoint):
    with serving(f"generator.checkpoint={generator_of_tiny_tokenizer}",
                 f"tokenizer.checkpoint={tokenizer_checkpoint}", "device=cpu") as running:
        yield running


def open_page(browser, url: str) -> WebDriverWait:
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(expected_conditions.element_to_be_clickable((By.ID, "generate-button")))  # /api/info was read
    return wait


def set_field(browser, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def loaded_images(browser) -> list:
    return browser.execute_script(
        "return [...document.querySelectorAll('img.sample')].filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => [i.naturalWidth, i.naturalHeight]);")


def test_choosing_a_class_and_generating_shows_the_images_and_the_generation_time(browser, server):
    wait = open_page(browser, server.url)
    classes = Select(browser.find_element(By.ID, "class-select"))
    assert len(classes.options) == 10
    classes.select_by_value("4")
    set_field(browser, "num-images", "3")
    browser.find_element(By.ID, "generate-button").click()
    wait.until(lambda driver: len(loaded_images(driver)) == 3)
    assert loaded_images(browser) == [[16, 16]] * 3
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("class 4: 3 images generated in ") and " s (sampling " in status, status
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_a_bad_schedule_shows_the_validation_message(browser, server):
    wait = open_page(browser, server.url)
    set_field(browser, "tokens-allocation", "2,2,3")
    browser.find_element(By.ID, "generate-button").click()
    error = browser.find_element(By.ID, "error")
    wait.until(lambda driver: error.is_displayed())
    assert "tokens_allocation=[2, 2, 3] sums to 7" in error.text and "sum to 6" in error.text
    # Fixed, the next generation clears the message.
    set_field(browser, "tokens-allocation", "2,2,2")
    browser.find_element(By.ID, "generate-button").click()
    wait.until(lambda driver: not error.is_displayed() and loaded_images(driver))


def test_the_guidance_grid_shows_one_column_per_value(browser, server):
    wait = open_page(browser, server.url)
    browser.find_element(By.ID, "grid-enabled").click()
    for element_id, value in (("grid-min", "1"), ("grid-max", "3"), ("grid-steps", "3"), ("num-images", "2")):
        set_field(browser, element_id, value)
    browser.find_element(By.ID, "generate-button").click()
    wait.until(lambda driver: len(loaded_images(driver)) == 6)
    columns = browser.find_elements(By.CSS_SELECTOR, "#results .column")
    assert [column.get_attribute("data-guidance") for column in columns] == ["1", "2", "3"]


@pytest.mark.skipif(not os.environ.get("BAR_APP_SCREENSHOT"), reason="BAR_APP_SCREENSHOT=<png> saves a screenshot")
def test_screenshot_of_a_guidance_grid(browser, generator_of_tiny_tokenizer, tokenizer_checkpoint):
    demo = all(path.is_file() for path in DEMO_CHECKPOINTS)
    generator, tokenizer = DEMO_CHECKPOINTS if demo else (generator_of_tiny_tokenizer, tokenizer_checkpoint)
    with serving(f"generator.checkpoint={generator}", f"tokenizer.checkpoint={tokenizer}", "device=cpu") as running:
        browser.set_window_size(1280, 960)  # the whole form and four rows of the grid
        wait = open_page(browser, running.url)
        Select(browser.find_element(By.ID, "class-select")).select_by_value("7" if demo else "1")
        browser.find_element(By.ID, "grid-enabled").click()
        for element_id, value in (("grid-min", "1"), ("grid-max", "5"), ("grid-steps", "5"), ("num-images", "4"),
                                  ("seed", "3")):
            set_field(browser, element_id, value)
        browser.find_element(By.ID, "generate-button").click()
        wait.until(lambda driver: len(loaded_images(driver)) == 20)
        path = Path(os.environ["BAR_APP_SCREENSHOT"])
        path = path if path.is_absolute() else ROOT / path
        path.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(path))
