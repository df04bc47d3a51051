"""serve.py's page in a real browser: Debian's headless Chromium driven through Selenium (nothing downloaded).
Without the browser the test is skipped with one line, except under CI=true, where that is a failure. Checked: the
first view (an invitation, no empty query tile or broken image), an upload, the frames, a click through, a refused
upload and a refused Top K (their error alone, no earlier results under it), phone widths, names holding a '\\'.

SERVE_DATABASE=PATH serves another database than the reference run's; SERVE_SCREENSHOT=FILE keeps the screenshot
(README's docs/serve.png is this test's on the demo database)."""
import os

import pytest
from PIL import Image

from _query_fixtures import make_database, make_split
from _serve_fixtures import request, start_server, stop_server, upload
from _train_fixtures import kill_groups, out
import retrieval

CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
GREEN, RED = 'rgba(26, 158, 58, 1)', 'rgba(211, 47, 47, 1)'  # the page's frames: the query's class, another class
LOADED = "return [...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length"
# images on screen that show nothing: no source, not loaded, or broken (the browser's placeholder)
BROKEN = "return [...document.images].filter(i => i.offsetParent !== null && (!i.complete || i.naturalWidth === 0))" \
         ".map(i => i.id || i.alt || i.src)"
NO_SIDEWAYS_SCROLL = 'return document.documentElement.scrollWidth <= document.documentElement.clientWidth'


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
    service = Service(CHROMEDRIVER, popen_kw={'start_new_session': True})  # chromedriver and its Chromium, one group
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
        driver.quit()
    finally:
        kill_groups([service.process])


def result_cards(driver):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, '#results .hit')


@pytest.mark.slow
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
        check_first_view(browser)
        # a photo chosen in the file field: its class is unknown, so no frames
        photo = some_image(base, db_path)
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
        # a phone's width: one column of controls, two of results, nothing wider than the screen (the page
        # itself, whose vertical scroll bar takes its width from the window's)
        for width in (390, 400):
            browser.set_window_size(width, 844)
            assert browser.execute_script(NO_SIDEWAYS_SCROLL), width
        browser.set_window_size(1100, 1000)
        check_refusals(browser, tmp_path)
    finally:
        try:
            stop_server(proc)
        finally:
            kill_groups([proc])


def check_first_view(browser):
    """Before any search: the invitation to start one; no query tile, no image that shows nothing."""
    from selenium.webdriver.common.by import By
    assert not browser.find_element(By.ID, 'query').is_displayed()
    assert browser.execute_script(BROKEN) == []
    intro = browser.find_element(By.ID, 'intro')
    assert intro.is_displayed() and 'Choose or drop a photo' in intro.text
    assert result_cards(browser) == [] and browser.find_element(By.ID, 'status').text == ''


def check_refusals(browser, tmp_path):
    """A refused upload, then a refused Top K, each after a search that showed results: the error alone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(browser, 30)
    assert len(result_cards(browser)) == 8
    text = tmp_path / 'notes.jpg'
    text.write_text('not a picture\n' * 10)
    browser.find_element(By.ID, 'file').send_keys(str(text))
    wait.until(lambda d: d.find_element(By.ID, 'status').get_attribute('class') == 'error')
    assert 'not an image' in browser.find_element(By.ID, 'status').text
    assert result_cards(browser) == [] and not browser.find_element(By.ID, 'query').is_displayed()
    assert browser.execute_script(BROKEN) == []
    browser.find_element(By.ID, 'random').click()  # results again
    wait.until(lambda d: d.execute_script(LOADED) == 8)
    field = browser.find_element(By.ID, 'k')
    for k in ('500', '0', '2.5'):
        field.clear()
        field.send_keys(k)
        browser.find_element(By.ID, 'random').click()
        wait.until(lambda d: d.find_element(By.ID, 'status').get_attribute('class') == 'error')
        assert browser.find_element(By.ID, 'status').text.startswith('Top K must be a whole number from 1 to 100'), k
        assert result_cards(browser) == [] and not browser.find_element(By.ID, 'query').is_displayed(), k
        field.clear()
        field.send_keys('3')
        browser.find_element(By.ID, 'random').click()
        wait.until(lambda d: d.execute_script(LOADED) == 3)
        assert browser.find_element(By.ID, 'status').get_attribute('class') == ''


@pytest.mark.slow
def test_names_are_split_on_slashes_only(browser, tmp_path):
    """A Linux file name may hold a '\\': the page shows the whole name, cut only at '/'."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    paths, labels, _ = make_split(str(tmp_path / 'images' / 'sub'), ['x', 'y', 'x', 'y'], seed=3)
    odd = os.path.join(os.path.dirname(paths[1]), 'deeper', 'back\\slash y.png')
    os.makedirs(os.path.dirname(odd))
    os.rename(paths[1], odd)
    paths[1] = odd
    db_path, _ = make_database(str(tmp_path / 'db'), (paths, labels))
    proc, base = start_server(db_path)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(base)
        wait.until(lambda d: '4 test images' in d.find_element(By.ID, 'info').text)
        _, answer = request(f'{base}api/search?index=0&k=3')
        assert 'deeper/back\\slash y.png' in [hit['path'] for hit in answer['results']]  # relative to the image root
        browser.find_element(By.ID, 'random').click()
        wait.until(lambda d: d.execute_script(LOADED) == 3)
        if '1' not in [c.get_attribute('data-index') for c in result_cards(browser)]:  # image 1 was the query
            result_cards(browser)[0].send_keys(Keys.ENTER)  # another one: the other three are its results
            wait.until(lambda d: 'database image 1' not in d.find_element(By.ID, 'query-text').text)
            wait.until(lambda d: d.execute_script(LOADED) == 3)
        card = [c for c in result_cards(browser) if c.get_attribute('data-index') == '1'][0]
        assert card.find_element(By.CSS_SELECTOR, '.file').text == 'back\\slash y.png'
        assert card.get_attribute('aria-label').endswith(', back\\slash y.png')
        card.send_keys(Keys.ENTER)
        wait.until(lambda d: 'database image 1: back\\slash y.png, label y' in d.find_element(By.ID, 'query-text').text)
    finally:
        try:
            stop_server(proc)
        finally:
            kill_groups([proc])


def some_image(base, db_path):
    """A picture to upload: the file of the database's nearest image to its image 0, as a user might choose it."""
    _, answer = request(f'{base}api/search?index=0&k=1')
    return retrieval.load_database(db_path)[0]['test_images'][answer['results'][0]['index']]
