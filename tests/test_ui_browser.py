"""The Gradio UI in a real browser: ./launch_gradio_api.sh + headless Debian Chromium.

Starts the launcher with the tiny model and an API key (API on 0.0.0.0, the UI on its
default 127.0.0.1), checks the page refuses to chat until a key is typed, attaches an
image, asks a question (English and Chinese), waits for the streamed answer and its usage
line, provokes a 413 and checks it reads as a message, opens /docs and /redoc with every
outside request blocked, checks the API still answers (test_api.sh --key), saves a
screenshot (to docs/ui.png too when UPDATE_SCREENSHOT=1) and stops everything with SIGTERM.  Needs /usr/bin/chromium (tests/run.sh
installs it) and the `playwright` package; it never downloads a browser.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, png_bytes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
QUESTION = "What is in this picture? 这张图片里有什么？"
MAX_IMAGE_BYTES = 20_000  # the API's cap in this test; the second image is larger → 413
API_KEY = "sk-browser-test"
# records [length, has usage line] of the last answer on every DOM change of the chat
WATCH_ANSWER = """() => {
  window.__seen = [];
  if (window.__observer) window.__observer.disconnect();
  const chat = document.querySelector('#chat');
  window.__observer = new MutationObserver(() => {
    const bots = chat.querySelectorAll('[data-testid=bot]');
    const text = bots.length ? bots[bots.length - 1].innerText : '';
    window.__seen.push([text.length, text.includes('tokens:')]);
  });
  window.__observer.observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def _launcher_extras() -> str:
    """EXTRAS for the launcher's bootstrap that match an install already made, so that
    running this test does not reinstall the project (the stamp is per EXTRAS string)."""
    venv = Path(os.environ.get("VENV", ROOT / ".venv"))
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    found = re.search(r'^EXTRAS="([^"]*)"', (ROOT / "tests" / "run.sh").read_text(), re.M)
    for extras in ([found.group(1)] if found else []) + ["ui"]:
        stamp = hashlib.sha256(pyproject + extras.encode() + b"\n").hexdigest()[:16]
        if "ui" in extras.split(",") and (venv / f".installed-{stamp}").exists():
            return extras
    return "ui"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _wait_http(url: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"launch_gradio_api.sh exited early ({proc.returncode}):\n"
                        f"{log.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} not ready in time:\n{log.read_text(errors='replace')[-4000:]}")


def _noise_png(path: Path, side: int = 160) -> None:
    from PIL import Image
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(path)


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_ui_in_browser(tiny_model, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium "
                    "(apt-get install -y chromium; tests/run.sh does it) to run the UI test")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("the `playwright` package is missing: pip install playwright "
                    "(or ./tests/run.sh, which installs the test extras)")

    api_port, ui_port = free_port(), free_port()
    while ui_port == api_port:
        ui_port = free_port()
    log = tmp_path / "launch.log"
    env = {**os.environ, "EXTRAS": _launcher_extras(), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("OPENAI_API_KEY", None)
    cmd = ["./launch_gradio_api.sh", "--model-path", tiny_model, "--port", str(api_port),
           "--ui-port", str(ui_port), "--host", "0.0.0.0", "--api-key", API_KEY,
           "--min-pixels", "4096",
           "--max-pixels", "65536", "--max-image-bytes", str(MAX_IMAGE_BYTES)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    api, ui = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ui_port}/"
    small, big = tmp_path / "picture.png", tmp_path / "too-big.png"
    small.write_bytes(png_bytes(96, 64))
    _noise_png(big)
    assert small.stat().st_size < MAX_IMAGE_BYTES < big.stat().st_size
    try:
        with sync_playwright() as pw:
            # the browser starts while the API loads the model
            ctx = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=CHROMIUM,
                args=CHROMIUM_ARGS, headless=True, viewport={"width": 1100, "height": 1250})
            try:
                # the UI comes up on its own and waits for the API (status line)
                _wait_http(ui, proc, log, time.time() + 120)
                pids = re.search(r"\[launch\] api pid (\d+) .* ui pid (\d+)", log.read_text())
                assert pids, log.read_text()
                children = [int(pids.group(1)), int(pids.group(2))]
                # one model, in the API process: the UI process never loads torch
                assert "libtorch" not in Path(f"/proc/{children[1]}/maps").read_text()
                # the UI listens on loopback only, although the API is on 0.0.0.0
                # (logged right after Gradio answers: the page can be up a moment before)
                until = time.time() + 15
                while (not re.search(rf"UI on http://127\.0\.0\.1:{ui_port} ", log.read_text())
                       and time.time() < until):
                    time.sleep(0.2)
                assert re.search(rf"UI on http://127\.0\.0\.1:{ui_port} ", log.read_text())
                page = ctx.new_page()
                page.goto(ui)
                expect(page.locator("#api-status")).to_contain_text(
                    "requires an API key", timeout=90_000)
                assert httpx.get(api + "/health", timeout=5).status_code == 200

                # no key typed: the chat is refused with a readable line, no answer
                bot = page.locator("#chat [data-testid=bot]")
                page.locator("#msg textarea").fill("Hello without a key?")
                page.locator("#msg textarea").press("Enter")
                expect(bot.last).to_contain_text("API key required (401)", timeout=30_000)
                assert "tokens:" not in bot.last.inner_text()
                page.locator("#chat").get_by_role("button", name="Clear").click()
                expect(bot).to_have_count(0, timeout=10_000)
                page.locator("#api-key input").fill(API_KEY)

                # sampling settings: short, greedy answers keep the test fast
                page.get_by_text("Sampling settings").click()
                for label, value in (("Temperature", "0"), ("Max tokens", "40")):
                    box = page.get_by_label(f"number input for {label}")
                    box.fill(value)
                    box.press("Enter")
                page.get_by_label("low").check()

                # turn 1: an image and a question
                page.locator("#msg input[type=file]").set_input_files(str(small))
                expect(page.locator("#msg img")).to_have_count(1, timeout=15_000)
                page.locator("#msg textarea").fill(QUESTION)
                page.evaluate(WATCH_ANSWER)
                page.locator("#msg textarea").press("Enter")
                expect(bot.last).to_contain_text("tokens:", timeout=60_000)
                lengths = [n for n, _ in page.evaluate("window.__seen")]
                answer = bot.last.inner_text()
                usage = re.search(r"tokens: (\d+) prompt \+ (\d+) completion · [\d.]+ s", answer)
                assert usage, f"no usage line in {answer!r}"
                assert int(usage.group(1)) > 10 and 1 <= int(usage.group(2)) <= 40, answer
                assert answer[:usage.start()].strip(), f"empty answer: {answer!r}"
                # streamed: the answer grew in several steps (the random model on the real
                # vocabulary all but never stops before 5 tokens: eos is 1 of 151,936)
                assert int(usage.group(2)) >= 5, answer
                assert len({n for n in lengths if n}) >= 3, lengths
                user = page.locator("#chat [data-testid=user]")
                expect(user.filter(has_text=QUESTION)).to_have_count(1)
                expect(page.locator("#chat .user-row img")).to_have_count(1)
                page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)

                # turn 2: an image over the API's cap → a readable 413 in the chat
                page.locator("#msg input[type=file]").set_input_files(str(big))
                expect(page.locator("#msg img")).to_have_count(1, timeout=15_000)
                page.locator("#msg textarea").fill("And this one?")
                page.locator("#msg textarea").press("Enter")
                expect(bot).to_have_count(2, timeout=30_000)
                expect(bot.last).to_contain_text("Too large (413)", timeout=30_000)
                chat_text = page.locator("#chat").inner_text()
                assert "Traceback" not in chat_text and "Error(" not in chat_text, chat_text
                page.screenshot(path=str(tmp_path / "ui-error.png"), full_page=True)

                # turn 3: text only; the history (turn 1's image and answer) goes along,
                # the failed turn 2 does not (its image would be refused again)
                page.locator("#msg textarea").fill("Describe the first picture again.")
                page.locator("#msg textarea").press("Enter")
                expect(bot).to_have_count(3, timeout=30_000)
                expect(bot.last).to_contain_text("tokens:", timeout=60_000)
                again = re.search(r"tokens: (\d+) prompt", bot.last.inner_text())
                assert again and int(again.group(1)) > int(usage.group(1)) + 10, \
                    bot.last.inner_text()

                # regenerate: the last answer is streamed again (still 3 answers)
                page.evaluate(WATCH_ANSWER)
                page.locator("#chat").get_by_role("button", name="Retry").last.click()
                page.wait_for_function(
                    "() => { const s = window.__seen; const i = s.findIndex(x => !x[1]);"
                    " return i >= 0 && s.slice(i).some(x => x[1]); }", timeout=60_000)
                expect(bot).to_have_count(3)
                expect(bot.last).to_contain_text("tokens:")

                # clear
                page.locator("#chat").get_by_role("button", name="Clear").click()
                expect(bot).to_have_count(0, timeout=10_000)

                # /docs and /redoc render with every request off this box refused
                outside: list[str] = []

                def only_local(route):
                    if httpx.URL(route.request.url).host in ("127.0.0.1", "localhost"):
                        return route.continue_()
                    outside.append(route.request.url)
                    return route.abort()

                docs = ctx.new_page()
                docs.route("**/*", only_local)
                docs.goto(api + "/docs")
                expect(docs.locator(".swagger-ui .info .title")).to_contain_text(
                    "Qwen3-VL", timeout=30_000)
                expect(docs.locator(".opblock-summary-path").filter(
                    has_text="/v1/models/{model}")).to_have_count(1)
                docs.goto(api + "/redoc")
                expect(docs.locator("h1").first).to_contain_text("Qwen3-VL", timeout=30_000)
                expect(docs.get_by_text("/v1/chat/completions").first).to_be_attached()
                assert not outside, outside
            finally:
                ctx.close()

        # the API still answers next to the UI
        check = subprocess.run(["./test_api.sh", "--key", API_KEY, api], cwd=ROOT,
                               capture_output=True, text=True, timeout=90)
        assert check.returncode == 0, check.stdout + check.stderr

        if os.environ.get("UPDATE_SCREENSHOT"):  # refresh the README's picture on request
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copyfile(tmp_path / "ui.png", ROOT / "docs" / "ui.png")
        print(f"screenshot: {tmp_path / 'ui.png'}")

        # the UI dying leaves the API serving (the bots' door), and the launcher says so
        os.kill(children[1], signal.SIGKILL)
        until = time.time() + 20
        while "the UI exited" not in log.read_text() and time.time() < until:
            time.sleep(0.1)
        assert "the API keeps serving" in log.read_text(), log.read_text()[-3000:]
        assert proc.poll() is None and _alive(children[0])
        assert httpx.get(api + "/health", timeout=5).status_code == 200

        # SIGTERM stops the launcher and what is left
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launcher still running 20 s after SIGTERM:\n{log.read_text()[-3000:]}")
        while any(_alive(p) for p in children) and time.time() - t0 < 20:
            time.sleep(0.1)
        assert not any(_alive(p) for p in children), \
            f"processes {[p for p in children if _alive(p)]} outlived SIGTERM"
        assert proc.returncode in (0, 143, -signal.SIGTERM), proc.returncode
    finally:  # whatever happened, nothing of the launcher's process group survives
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
