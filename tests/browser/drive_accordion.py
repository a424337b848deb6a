"""The browser test's driver, run with the gradio 3.41.2 environment (.venv-ui):

1. mounts the script's ui() in a gradio page, with stand-ins for the WebUI modules ui() touches
   (tests/browser/stand_ins), the extension's style.css and its tooltip javascript;
2. drives Debian's chromium with Playwright: opens the accordion, enables guidance, fills a
   concept, reads the values back, picks a preset, reads them again;
3. prints what it saw as one JSON line (tests/test_browser_ui.py asserts on it) and keeps
   screenshots in the artifacts folder given as argv[1].

"Reading back" clicks a test-only button whose handler receives the script's components as
inputs, so the values are the ones the WebUI would hand to the script's process().
"""
import json
import os
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(HERE, "stand_ins"), ROOT]

import gradio as gr  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

CHROMIUM = os.environ.get("LDG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage"]


def load_script():
    import importlib.util
    path = os.path.join(ROOT, "scripts", "latent_diffusion_guidance.py")
    spec = importlib.util.spec_from_file_location("latent_diffusion_guidance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_page():
    module = load_script()
    script = module.LatentDiffusionGuidanceScript()
    script.is_img2img = False
    with open(os.path.join(ROOT, "style.css"), encoding="utf-8") as file:
        css = file.read()
    with open(os.path.join(ROOT, "javascript", "latent_diffusion_guidance.js"), encoding="utf-8") as file:
        tooltips_js = "() => {\n" + file.read() + "\n}"
    with gr.Blocks(css=css, title="LDG browser test") as demo:
        with gr.Column(elem_id="ldg-test-column"):
            args = script.ui(False)
        read = gr.Button("Read values", elem_id="ldg-test-read")
        values = gr.Textbox(label="values", elem_id="ldg-test-values")
        read.click(fn=lambda *a: json.dumps(list(a)), inputs=args, outputs=[values])
        demo.load(fn=None, inputs=None, outputs=None, _js=tooltips_js)
    return demo, len(args)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_values(page):
    box = page.locator("#ldg-test-values textarea")
    before = box.input_value()
    page.click("#ldg-test-read")
    deadline = time.time() + 20
    while time.time() < deadline:
        now = box.input_value()
        if now and now != before:
            return json.loads(now)
        page.wait_for_timeout(100)
    raise AssertionError("the values never came back")


def drive(url, artifacts):
    seen = {}
    pid = "script_txt2img_latent_diffusion_guidance_"
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="ldg-chromium-") as profile:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 1400})
        page = browser.new_page()
        page.goto(url)
        accordion = page.locator(f"#{pid}ldg")
        accordion.wait_for()
        prompt1 = page.locator(f"#{pid}ldg_slot1_prompt textarea")
        seen["closed_by_default"] = not prompt1.is_visible()
        accordion.locator(".label-wrap").first.click()
        prompt1.wait_for(state="visible")
        seen["slots_visible"] = [page.locator(f"#{pid}ldg_slot{n}_prompt textarea").is_visible()
                                 for n in range(1, 11)]
        page.locator(f"#{pid}ldg-checkbox input").check()
        prompt1.fill("glasses, round, (gold:1.2)")
        page.locator(f"#{pid}ldg_slot1_direction label", has_text="remove").click()
        scale = page.locator(f"#{pid}ldg_slot1_scale input")
        scale.fill("7.5")
        scale.press("Tab")
        page.locator(f"#{pid}ldg_concept_maps input").check()
        seen["after_fill"] = read_values(page)
        seen["tooltip_scale"] = page.locator(f"#{pid}ldg_slot1_scale").get_attribute("title")
        page.screenshot(path=os.path.join(artifacts, "accordion-filled.png"), full_page=True)

        dropdown = page.locator(f"#{pid}ldg_preset")
        dropdown.locator("input").click()
        page.locator("ul.options li", has_text="Quality and art direction").first.click()
        page.wait_for_function(
            "() => document.querySelector('#%sldg_slot2_prompt textarea').value.length > 0" % pid)
        seen["after_preset"] = read_values(page)
        column = page.locator("#ldg-test-column")
        column.screenshot(path=os.path.join(artifacts, "accordion-light.png"))
        page.goto(url + "?__theme=dark")
        page.locator(f"#{pid}ldg").wait_for()
        page.locator(f"#{pid}ldg .label-wrap").first.click()
        page.locator(f"#{pid}ldg_slot1_prompt textarea").wait_for(state="visible")
        page.locator("#ldg-test-column").screenshot(path=os.path.join(artifacts, "accordion-dark.png"))
        browser.close()
    return seen


def main():
    artifacts = sys.argv[1]
    os.makedirs(artifacts, exist_ok=True)
    demo, count = build_page()
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                        quiet=True, show_api=False)
    try:
        seen = drive(f"http://127.0.0.1:{port}/", artifacts)
    finally:
        demo.close()
    seen["argument_count"] = count
    print("LDG-RESULT " + json.dumps(seen))


if __name__ == "__main__":
    main()
