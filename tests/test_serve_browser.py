"""serve.py's page in a real browser: Debian's headless Chromium driven through Selenium (nothing downloaded).
Without the browser the test is skipped with one line, except under CI=true, where that is a failure.

SERVE_DATABASE=PATH serves another database than the reference run's; SERVE_SCREENSHOT=FILE keeps the screenshot
(README's docs/serve.png is this test's on the demo database)."""
import os

import pytest
from PIL import Image

from _serve_fixtures import REPO, request, start_server, stop_server, upload
from _train_fixtures import out

CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
GREEN, RED = 'rgba(26, 158, 58, 1)', 'rgba(211, 47, 47, 1)'  # the page's frames: the query's class, another class
LOADED = "return [...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length"


def require_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append('the selenium package')
    if missing:
        reason = f'no headless browser: {", ".join(missing)} missing (apt-get install chromium chromium-driver)'
        if os.environ.get('CI') == 'true':
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def browser(tmp_path):
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run', '--window-size=1100,1000',
                 f'--user-data-dir={tmp_path / "profile"}'):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def result_cards(driver):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, '#results .hit')


def test_page_upload_frames_click_through(reference, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    db_path = os.environ.get('SERVE_DATABASE') or out(reference[0], 'data_base.pth')
    proc, base = start_server(db_path)
    try:
        _, info = request(base + 'api/info')
        wait = WebDriverWait(browser, 30)
        browser.get(base)
        wait.until(lambda d: f'{info["images"]} test images' in d.find_element(By.ID, 'info').text)
        # a photo chosen in the file field: its class is unknown, so no frames
        photo = some_image(base)
        _, answer = upload(base, open(photo, 'rb').read(), k=8)
        browser.find_element(By.ID, 'file').send_keys(photo)
        wait.until(lambda d: d.execute_script(LOADED) == 8)
        cards = result_cards(browser)
        assert [int(c.get_attribute('data-index')) for c in cards] == [h['index'] for h in answer['results']]
        assert all(c.get_attribute('class') == 'hit' for c in cards)
        assert 'class unknown' in browser.find_element(By.ID, 'query-text').text
        assert ' ms' in browser.find_element(By.ID, 'status').text  # the time the search took
        # the keyboard: a result is a button; Enter makes it the next query, a database image of known class
        chosen = cards[2]
        index, label = int(chosen.get_attribute('data-index')), chosen.get_attribute('data-label')
        chosen.send_keys(Keys.ENTER)
        wait.until(lambda d: f'database image {index}:' in d.find_element(By.ID, 'query-text').text)
        wait.until(lambda d: d.execute_script(LOADED) == 8 and
                   all('same' in c.get_attribute('class') or 'other' in c.get_attribute('class')
                       for c in result_cards(d)))
        cards = result_cards(browser)
        assert browser.find_element(By.ID, 'query-img').get_attribute('src').endswith(f'/images/{index}')
        assert index not in [int(c.get_attribute('data-index')) for c in cards]  # itself excluded
        colours = [(c.get_attribute('data-label') == label, c.value_of_css_property('border-top-color')) for c in cards]
        assert {(same, colour) for same, colour in colours} <= {(True, GREEN), (False, RED)}, colours
        shot = os.environ.get('SERVE_SCREENSHOT') or str(tmp_path / 'serve.png')
        browser.save_screenshot(shot)
        Image.open(shot).convert('RGB').quantize(128).save(shot, optimize=True)  # a small file for the docs
        assert Image.open(shot).size[0] > 0
        # a phone's width: one column of controls, two of results, nothing wider than the screen
        browser.set_window_size(390, 844)
        assert browser.execute_script('return document.documentElement.scrollWidth <= window.innerWidth')
    finally:
        stop_server(proc)


def some_image(base):
    """A picture to upload: the file of the database's nearest image to its image 0, as a user might choose it."""
    _, answer = request(f'{base}api/search?index=0&k=1')
    return os.path.join(REPO, answer['results'][0]['path'])  # a path in the database is relative to where it runs
