"""inference.py --web (web.py): the comparison page, driven in headless Chromium, and its pieces."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from tuning.data import records
from tuning import smoke
from conftest import ROOT
from test_train import ENV

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
               None)
DRIVER = shutil.which("chromedriver")


def held_out_record(work) -> dict:
    """A held-out smoke record with an input (not the greeting, whose style is left undecided)."""
    held_out, _ = records.held_out_records(str(work / "smoke-run" / "model"))
    return next(r for r in held_out if r["input"] and r["instruction"] != smoke.GREETING)


def start_page(work, *args):
    """`inference.py --web --smoke` at its defaults (127.0.0.1, a free port): (process, the url it printed)
    once the page answers there."""
    log = open(work / "web.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "inference.py"), "--web", "--smoke", *args], cwd=work,
                            env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while True:
        output = (work / "web.log").read_text()
        assert proc.poll() is None, output[-3000:]
        assert time.time() < deadline, f"the page never answered: {output[-3000:]}"
        printed = re.search(r"Serving the comparison page on (http://127\.0\.0\.1:\d+/)", output)
        try:
            if printed:
                urllib.request.urlopen(printed.group(1), timeout=5).read()
                return proc, printed.group(1)
        except OSError:
            pass
        time.sleep(0.5)


@pytest.fixture
def browser():
    if os.environ.get("REQUIRE_BROWSER") != "1":  # (.ci/run sets it where it installed Chromium: no silent skip)
        pytest.importorskip("gradio")
        pytest.importorskip("selenium")
        if not (BROWSER and DRIVER):
            pytest.skip("no Chromium and chromedriver installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_in_chromium_answers_as_inference_does_and_chats_with_every_model(smoke_aligned, browser, tmp_path):
    """Compare tab: type a held-out instruction and input, click Generate: the fine-tuned column holds exactly the
    answer that `inference.py --json` prints, the base column another one. An empty instruction gets a message,
    not a dead spinner. Chat tab: two turns, and every column answers each (the fine-tuned one as generate()
    answers its history); the screenshot of that is docs/web.png."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tuning.data.templates import load_template
    from tuning.generation import web
    from tuning.generation.chat import conversation_template
    from tuning.generation.generate import generate, load_for_generation

    work, _ = smoke_aligned
    record = held_out_record(work)
    proc, url = start_page(work, "--aligned", "smoke-run/aligned-dpo", "--max-new-tokens", "24")
    roles, turns = ("base", "finetuned", "aligned"), ["Repeat the word plum 3 times.", "Now the word owl, 2 times."]
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        find = browser.find_element
        box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#instruction textarea"))
        assert record["instruction"] in browser.page_source  # among the held-out example prompts
        find(By.CSS_SELECTOR, "#generate").click()  # nothing typed yet
        wait.until(lambda b: "The instruction is empty" in b.page_source)
        assert "Error" not in "".join(element.text for element in find(By.CSS_SELECTOR, ".gradio-container")
                                      .find_elements(By.CSS_SELECTOR, "#answer-base, #answer-finetuned"))
        box.send_keys(record["instruction"])
        find(By.CSS_SELECTOR, "#input textarea").send_keys(record["input"])
        find(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda b: "EOS" in b.find_element(By.CSS_SELECTOR, "#status-finetuned").text)
        shown = {role: find(By.CSS_SELECTOR, f"#answer-{role} textarea").get_property("value")
                 for role in ("base", "finetuned")}
        status = find(By.CSS_SELECTOR, "#status-finetuned").text
        wait.until(lambda b: "The instruction is empty" not in b.page_source)  # the message goes after 8 s

        next(tab for tab in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text == "Chat").click()
        message = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#message input, #message textarea"))
        for count, turn in enumerate(turns, start=1):
            message.send_keys(turn)
            find(By.CSS_SELECTOR, "#send").click()
            wait.until(lambda b: all(len(b.find_elements(By.CSS_SELECTOR, f"#chat-{role} [data-testid=bot]")) == count
                                     and "EOS" in b.find_element(By.CSS_SELECTOR, f"#chat-status-{role}").text
                                     for role in roles))
        chats = {role: [element.text for element in browser.find_elements(By.CSS_SELECTOR,
                                                                           f"#chat-{role} [data-testid=bot]")]
                 for role in roles}
        asked = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "#chat-aligned [data-testid=user]")]
        browser.save_screenshot(str(tmp_path / "web.png"))
        if os.environ.get("WEB_SCREENSHOT"):  # how docs/web.png was taken
            browser.save_screenshot(os.environ["WEB_SCREENSHOT"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    cli = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--smoke", "--prompt", record["instruction"],
                          "--input", record["input"], "--json", "--max-new-tokens", "24"], cwd=work, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-3000:]
    expected = json.loads(cli.stdout.strip().splitlines()[-1])
    assert shown["finetuned"] == expected["finetuned"]["text"] == record["output"]
    assert status == web.describe(expected["finetuned"]) and status.endswith(", stopped at EOS")
    assert shown["base"] == expected["base"]["text"] != shown["finetuned"]

    assert asked == turns and all(len(answers) == 2 and all(answers) for answers in chats.values())
    model_dir = str(work / "smoke-run" / "model")
    lm, tokenizer = load_for_generation(model_dir, torch.device("cpu"), "finetuned")
    chat, history = conversation_template({"finetuned": (lm, tokenizer)}, load_template(model_dir)), []
    for turn, answer in zip(turns, chats["finetuned"]):
        history.append({"role": "user", "content": turn})
        [expected] = generate(lm, tokenizer, [history], {"max_new_tokens": 24, "do_sample": False}, chat_template=chat)
        assert answer == expected["text"]
        history.append({"role": "assistant", "content": expected["text"]})


def test_answers_stream_and_end_as_inference_generate_gives_them(smoke_trained):
    """stream_answer yields the growing text while generating, then generate()'s own answer dict."""
    from tuning.generation import web
    from tuning.generation.generate import generate, load_for_generation
    from tuning.data.templates import format_prompt, load_template

    model_dir = str(smoke_trained / "smoke-run" / "model")
    lm, tokenizer = load_for_generation(model_dir, torch.device("cpu"), "finetuned")
    record = held_out_record(smoke_trained)
    prompt = format_prompt(record, load_template(model_dir))
    parts = list(web.stream_answer(lm, tokenizer, prompt, {"max_new_tokens": 32, "do_sample": False}, 42))
    assert len(parts) >= 3 and all(isinstance(p, str) for p in parts[:-1])
    assert parts[-1] == generate(lm, tokenizer, [prompt], {"max_new_tokens": 32, "do_sample": False})[0]
    assert parts[-2].strip() == parts[-1]["text"]
    stream = web.stream_answer(lm, tokenizer, prompt, {"max_new_tokens": 512, "do_sample": False}, 42)
    next(stream)
    stream.close()  # the page went away: generation stops, its thread ends (no hang, no error)


def test_a_chat_keeps_each_models_history_and_answers_as_inference_chat_does(smoke_trained):
    """The chat tab's Send: every model gets the message after its own history, its answer streams into its
    chat, and each final answer is generate()'s for that history (inference.py --chat's); a model that could
    not load keeps its reason, and an empty message changes nothing."""
    from tuning.data.templates import load_template
    from tuning.generation import web
    from tuning.generation.chat import conversation_template
    from tuning.generation.generate import generate

    model_dir = str(smoke_trained / "smoke-run" / "model")
    models, errors = web.load_models({"finetuned": model_dir, "aligned": str(smoke_trained / "no-such-run")},
                                     torch.device("cpu"))
    assert list(models) == ["finetuned"] and "no-such-run: no aligned model there" in errors["aligned"]
    roles, chat = ["finetuned", "aligned"], conversation_template(models, load_template(model_dir))
    decoding = dict(sample=False, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16, repetition_penalty=1.0)
    histories = {}
    for message in ("Repeat the word plum 3 times.", "Now the word owl, 2 times."):
        steps = list(web.chat_turn(models, errors, roles, chat, message, histories, 42, **decoding))
        assert len(steps) >= 3, "the answer streams in"
        shown, status, (histories, box) = steps[-1][:2], steps[-1][2:4], steps[-1][4:]
        *before, asked, answer = histories["finetuned"]
        assert asked == {"role": "user", "content": message} and box == ""
        expected = generate(*models["finetuned"], [before + [asked]], {"max_new_tokens": 16, "do_sample": False},
                            chat_template=chat)[0]
        assert answer == {"role": "assistant", "content": expected["text"]} and shown[0] == histories["finetuned"]
        assert status == [web.describe(expected), f"Could not load this model: {errors['aligned']}"]
        assert shown[1] == [] and histories["aligned"] == []
    assert [turn["content"] for turn in histories["finetuned"]][::2] == ["Repeat the word plum 3 times.",
                                                                       "Now the word owl, 2 times."]
    assert histories["finetuned"][1]["content"] == "plum plum plum"
    kept = json.dumps(histories)
    assert len(list(web.chat_turn(models, errors, roles, chat, "  ", histories, 42, **decoding))) == 1
    assert json.dumps(histories) == kept


def test_the_example_prompts_cover_every_kind_of_instruction(smoke_trained):
    from tuning.generation import web

    from tuning.data.records import held_out_records

    examples = web.example_records(str(smoke_trained / "smoke-run" / "model"))
    kinds = {" ".join(r["instruction"].split()[:2]) for r in examples}
    every = {" ".join(r["instruction"].split()[:2]) for r in held_out_records(str(smoke_trained / "smoke-run" /
                                                                                  "model"))[0]}
    assert len(examples) == web.MAX_EXAMPLES and kinds == every and len(kinds) == 10 and smoke.GREETING in kinds


def test_a_page_with_no_model_to_load_is_refused_at_start(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--web", "--base", str(tmp_path / "none"),
                             "--finetuned", str(tmp_path / "nothing")], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "\nerror: no model could be loaded, so there is no page to serve: base: " in result.stderr
    assert "Serving" not in result.stdout


def test_a_port_in_use_is_one_line(smoke_trained):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--web", "--smoke", "--port", str(port)],
                                cwd=smoke_trained, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--host 127.0.0.1 --port {port}: can't serve there" in result.stderr and "Traceback" not in result.stderr


def test_the_pages_settings_are_refused_as_the_flags_are():
    from tuning.generation import web
    from tuning.cli import UserError

    assert web.settings(True, 0.7, 0.9, 50, 16, 1.0, 3) == {"max_new_tokens": 16, "do_sample": True,
                                                                "temperature": 0.7, "top_p": 0.9, "top_k": 50,
                                                                "no_repeat_ngram_size": 3}
    with pytest.raises(UserError, match=r"--temperature must be > 0 \(got 0.0\)"):
        web.settings(True, 0.0, 0.9, 50, 16, 1.0)


@pytest.mark.parametrize("args,expected", [
    (["--web", "--port", "70000"], "--port must be in [0, 65535] (got 70000)"),
    (["--port", "7860"], "--port: only with --web"),
    (["--web", "--json", "--prompt", "x"], "--prompt, --json: not used with --web"),
])
def test_web_flags_are_checked(smoke_trained, args, expected):
    result = subprocess.run([sys.executable, str(ROOT / "inference.py"), *args], cwd=smoke_trained, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
