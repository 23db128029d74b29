"""Drive the chat page in a headless Chromium: upload a demo image, ask, compare with the full model, screenshot it.

Starts ``train/serve.py`` on 127.0.0.1 (the demo model and heads), opens ``/`` in Debian's ``chromium`` through
``chromedriver`` and ``selenium`` (the driver path is given explicitly: Selenium Manager never downloads anything),
asks the question of a demo test record whose heads exit early (the latest such exit among the first 16), clicks
"Ask the full model", and saves a PNG:

    python benchmarks/page_screenshot.py                              # -> docs/serve_page.png (the README's picture)
    python benchmarks/page_screenshot.py --output runs/serve/page.png --record 7

``tests/serve/test_page.py`` drives the page with the same helpers (:func:`chrome`, :func:`ask`, :func:`ask_full`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("page_screenshot")

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def chrome(chromium: str, chromedriver: str, width: int = 1280, height: int = 720) -> Iterator[Any]:
    """A headless Chromium WebDriver (``chromium`` binary, ``chromedriver`` path), quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_done(driver: Any, element_id: str, timeout: float) -> str:
    """Wait until ``#element_id``'s ``data-done`` leaves ``false``; return its text, or raise with the page's error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    element = driver.find_element(By.ID, element_id)
    WebDriverWait(driver, timeout).until(lambda d: element.get_attribute("data-done") != "false")
    if element.get_attribute("data-done") != "true":
        raise RuntimeError(f"the page reports an error: {driver.find_element(By.ID, 'error').text!r}")
    return element.text


def ask(
    driver: Any, url: str, image: Path, question: str, timeout: float = 120.0, fields: dict[str, str] | None = None
) -> dict[str, Any]:
    """Load the page, upload ``image``, ask ``question``, wait for the streamed answer. The method is the server's
    default unless ``fields`` types into the method inputs (``{"static-layer": "4"}``, ``{"threshold": "0.5"}``).

    Returns the answer and what the withdrawal panel shows: ``exit_layer``, ``num_layers``, ``flops_saved``,
    ``kv_saved`` (texts) and ``bars`` (``[(layer, probability text, is the exit bar)]``).
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/")
    driver.find_element(By.ID, "image-input").send_keys(str(image))
    preview = driver.find_element(By.ID, "preview")
    WebDriverWait(driver, 30).until(lambda d: (preview.get_attribute("src") or "").startswith("data:image/"))
    driver.find_element(By.ID, "question").send_keys(question)
    for element_id, value in (fields or {}).items():
        driver.find_element(By.ID, element_id).send_keys(value)
    driver.find_element(By.ID, "ask").click()
    answer = _wait_done(driver, "answer", timeout)
    text = lambda element_id: driver.find_element(By.ID, element_id).text
    bars = [
        (int(bar.get_attribute("data-layer")), bar.get_attribute("data-probability"), "exit" in classes.split())
        for bar in driver.find_elements(By.CSS_SELECTOR, "#exit-chart .bar")
        for classes in [bar.get_attribute("class") or ""]
    ]
    return {
        "answer": answer,
        "exit_layer": text("exit-layer"),
        "num_layers": text("num-layers"),
        "flops_saved": text("flops-saved"),
        "kv_saved": text("kv-saved"),
        "bars": bars,
    }


def ask_full(driver: Any, timeout: float = 120.0) -> dict[str, str]:
    """Click "Ask the full model" and wait; the full answer, its exit layer and whether the page says they agree."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "ask-full").click()
    answer = _wait_done(driver, "full-answer", timeout)
    text = lambda element_id: driver.find_element(By.ID, element_id).text
    return {"answer": answer, "exit_layer": text("full-exit-layer"), "agree": text("answers-agree")}


def early_exit_record(records: Sequence[dict], exits: Sequence[int], num_layers: int) -> int:
    """The index of the first record whose heads exit before the last layer (else 0): the page then shows a saving."""
    return next((i for i, layer in enumerate(exits) if layer < num_layers), 0)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO_ROOT / "docs" / "serve_page.png"), help="PNG to write")
    parser.add_argument("--record", type=int, help="demo test record (default: the first whose heads exit early)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=740)
    args = parser.parse_args(argv)
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        parser.error("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import serve_load

    from dyvte.demo import demo_checkpoint_dir, load_demo_dataset

    model_dir, heads_dir = demo_checkpoint_dir("demo-mllm"), demo_checkpoint_dir("demo-exit-heads")
    dataset = load_demo_dataset("test")
    records = [dataset[i] for i in range(16)]
    reference = serve_load.offline_reference(model_dir, heads_dir, records, ["heads"], 16)
    exits = [reference["heads", i][1] for i in range(len(records))]
    # default: the latest early exit among them, so that the chart shows several heads' probabilities
    index = args.record if args.record is not None else max(range(len(records)), key=lambda i: (exits[i] < 8, exits[i]))
    record = dataset[index]
    with tempfile.TemporaryDirectory(prefix="dyvte-page-") as tmp, serve_load.start_server() as server:
        image = Path(tmp) / "scene.png"
        record["image"].save(image)
        with chrome(chromium, chromedriver, args.width, args.height) as driver:
            ask(driver, server.url, image, record["question"])  # a warm-up: the first request's times include it
            shown = ask(driver, server.url, image, record["question"])
            full = ask_full(driver)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(args.output)
    logger.info("record %d %r: page %s, full %s", index, record["question"], shown, full)
    logger.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
