"""The chat page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by ``selenium``):
the answer it streams and the exit layer it shows equal the offline greedy result of the same record."""

from __future__ import annotations

import pytest

from ..scripts import REPO_ROOT, load_script
from ..tools import require_module, require_program

INSTALL_CHROMIUM = "apt-get install chromium chromium-driver"


@pytest.mark.slow
def test_page_streams_the_offline_answer_and_exit_layer_and_compares_with_full(tmp_path, monkeypatch):
    chromium = require_program("chromium", tool="chromium", install=INSTALL_CHROMIUM)
    chromedriver = require_program("chromedriver", tool="chromium", install=INSTALL_CHROMIUM)
    require_module("selenium", tool="selenium", install="pip install -e '.[serve-tests]'")
    require_module("fastapi", tool="serve", install="pip install -e '.[serve]'")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver or browser
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from dyvte.demo import demo_checkpoint_dir, load_demo_dataset

    load = load_script("benchmarks/serve_load.py")
    page = load_script("benchmarks/page_screenshot.py")
    model_dir, heads_dir = demo_checkpoint_dir("demo-mllm"), demo_checkpoint_dir("demo-exit-heads")
    dataset = load_demo_dataset("test")
    records = [dataset[i] for i in range(16)]
    num_layers = 8
    reference = load.offline_reference(model_dir, heads_dir, records, ["heads", "full", "heads:0.5"], 16)
    index = page.early_exit_record(records, [reference["heads", i][1] for i in range(len(records))], num_layers)
    answer, exit_layer = reference["heads", index]
    full_answer, _ = reference["full", index]
    assert exit_layer < num_layers, "no demo record among the first 16 exits early: the page would show no saving"
    image = tmp_path / "scene.png"
    records[index]["image"].save(image)

    with load.start_server(log_path=tmp_path / "server.log") as server:
        with page.chrome(chromium, chromedriver) as driver:
            driver.get(f"{server.url}/")  # bad input on the page: it says what is wrong and sends nothing
            driver.find_element(By.ID, "ask").click()
            no_question = driver.find_element(By.ID, "error").text
            driver.find_element(By.ID, "question").send_keys(records[index]["question"])
            driver.find_element(By.ID, "ask").click()
            no_image = driver.find_element(By.ID, "error").text
            notes = tmp_path / "notes.txt"
            notes.write_text("not an image")
            driver.find_element(By.ID, "image-input").send_keys(str(notes))
            WebDriverWait(driver, 10).until(lambda d: "not an image" in d.find_element(By.ID, "error").text)
            not_image = driver.find_element(By.ID, "error").text
            assert driver.find_element(By.ID, "answer").get_attribute("data-done") == "false"  # nothing was asked
            shown = page.ask(driver, server.url, image, records[index]["question"])  # the server's default: heads
            full = page.ask_full(driver)
            screenshot = REPO_ROOT / "runs" / "serve" / "page.png"
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
            # a method the server was not started with: the page shows the server's 400 message, keeps the question
            driver.find_element(By.ID, "static-layer").send_keys("3")
            driver.find_element(By.ID, "ask").click()
            state = lambda: driver.find_element(By.ID, "answer").get_attribute("data-done")
            WebDriverWait(driver, 60).until(lambda _: state() != "false")
            assert state() == "error"
            refused = driver.find_element(By.ID, "error").text
            assert driver.find_element(By.ID, "question").get_attribute("value") == records[index]["question"]
            again = page.ask(driver, server.url, image, records[index]["question"])  # and the server still answers
            other = page.ask(driver, server.url, image, records[index]["question"], fields={"threshold": "0.5"})
        assert server.process.poll() is None, server.log_tail()

    assert shown["answer"] == answer.strip()
    assert shown["exit_layer"] == str(exit_layer)
    assert shown["num_layers"] == str(num_layers)
    # one bar per head (head j decides the exit at layer j + 1), the exit layer's bar marked
    assert [layer for layer, _, _ in shown["bars"]] == list(range(1, num_layers))
    assert [layer for layer, _, marked in shown["bars"] if marked] == [exit_layer]
    assert float(shown["bars"][exit_layer - 1][1]) >= 0.0  # the head that fired ran and reported a probability
    assert shown["flops_saved"].endswith("%") and float(shown["flops_saved"].rstrip("%")) > 0
    assert shown["kv_saved"].split("%")[0] and float(shown["kv_saved"].split("%")[0]) > 0
    assert full["answer"] == full_answer.strip()
    assert full["exit_layer"] == str(num_layers)
    assert full["agree"] == ("agree" if full_answer.strip() == answer.strip() else "differ")
    assert screenshot.stat().st_size > 1000
    assert no_question == "type a question first"
    assert no_image == "pick or drop an image first"
    assert not_image == "notes.txt is not an image (text/plain)"
    assert refused.startswith("400: ") and "static:3" in refused, refused
    assert (again["answer"], again["exit_layer"]) == (shown["answer"], shown["exit_layer"])
    other_answer, other_exit = reference["heads:0.5", index]
    assert (other["answer"], other["exit_layer"]) == (other_answer.strip(), str(other_exit))  # heads:P, P = 0.5
