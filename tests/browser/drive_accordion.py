"""The browser test's driver, run with a page environment: .venv-ui (gradio 3.41.2, A1111 and
reForge) or .venv-ui4 (gradio 4.40.0, Forge and Forge Neo). One code path for both; the few
places where gradio 3 and 4 differ say so.

1. mounts the script's ui() in a gradio page, with stand-ins for the WebUI modules ui() touches
   (tests/browser/stand_ins), the extension's style.css and its tooltip javascript;
2. drives Debian's chromium with Playwright: opens the accordion, enables guidance, fills a
   concept, reads the values back, picks a preset, reads them again;
3. prints what it saw as one JSON line (tests/test_browser_ui.py asserts on it) and keeps
   screenshots, named accordion-gradio<major>-*.png, in the artifacts folder given as argv[1].

"Reading back" clicks a test-only button whose handler receives the script's components as
inputs, so the values are the ones the WebUI would hand to the script's process().

style.css and the javascript go in as the WebUI adds them (serve_like_the_webui), not as
gr.Blocks(css=...) and a load event: gradio 4 prefixes Blocks css with "gradio-app
.gradio-container.gradio-container-4-40-0 .contain", which lifts every rule over gradio's own
and would hide what Forge shows.
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

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
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


def serve_like_the_webui():
    """The WebUI adds its extensions' files to the page it serves by rewriting gradio's template
    response (reload_javascript() in modules/ui_gradio_extensions.py, A1111 and Forge alike):
    each javascript file as a <script> at the end of <head>, each style.css as a stylesheet at
    the end of <body>, so that at equal specificity an extension's rule wins over gradio's.
    This page does the same with the extension's two files, inline."""
    with open(os.path.join(ROOT, "javascript", "latent_diffusion_guidance.js"),
              encoding="utf-8") as file:
        before_head_end = f"<script>\n{file.read()}\n</script>\n".encode("utf-8")
    with open(os.path.join(ROOT, "style.css"), encoding="utf-8") as file:
        before_body_end = f"<style>\n{file.read()}\n</style>\n".encode("utf-8")
    plain = gr.routes.templates.TemplateResponse

    def with_extension_files(*args, **kwargs):
        response = plain(*args, **kwargs)
        body = response.body.replace(b"</head>", before_head_end + b"</head>", 1)
        response.body = body.replace(b"</body>", before_body_end + b"</body>", 1)
        response.init_headers()  # the new Content-Length
        return response
    gr.routes.templates.TemplateResponse = with_extension_files


def build_page():
    module = load_script()
    script = module.LatentDiffusionGuidanceScript()
    script.is_img2img = False
    serve_like_the_webui()
    img2img = module.LatentDiffusionGuidanceScript()
    img2img.is_img2img = True
    with gr.Blocks(title="LDG browser test") as demo:
        with gr.Column(elem_id="ldg-test-column"):
            args = script.ui(False)
        with gr.Column(elem_id="ldg-test-img2img"):
            img2img.ui(True)  # the same accordion in img2img, where "Keep the image" shows
        read = gr.Button("Read values", elem_id="ldg-test-read")
        values = gr.Textbox(label="values", elem_id="ldg-test-values")
        read.click(fn=lambda *a: json.dumps(list(a)), inputs=args, outputs=[values])
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


TOOLTIPS = """() => {
    // Every tooltip the page carries (txt2img's accordion and img2img's), per ldg-* class: the
    // distinct titles of its elements.
    var found = {};
    document.querySelectorAll('[id^="ldg-test-"] [class*="ldg-"]').forEach(function(node) {
        node.classList.forEach(function(name) {
            if (name.indexOf("ldg-") !== 0) return;
            found[name] = found[name] || [];
            if (found[name].indexOf(node.title) < 0) found[name].push(node.title);
        });
    });
    return found;
}"""


def drive(url, artifacts):
    seen = {}
    pid = "script_txt2img_latent_diffusion_guidance_"

    def screenshot(name):
        return os.path.join(artifacts, f"accordion-gradio{GRADIO_MAJOR}-{name}.png")
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
        seen["keep_image_in_txt2img"] = page.locator(f"#{pid}ldg_keep_image input").is_visible()
        ipid = "script_img2img_latent_diffusion_guidance_"
        page.locator(f"#{ipid}ldg .label-wrap").first.click()
        keep = page.locator(f"#{ipid}ldg_keep_image input")
        keep.wait_for(state="visible")
        keep.check()
        seen["keep_image_in_img2img"] = keep.is_checked()
        seen["keep_image_title"] = page.locator(f"#{ipid}ldg_keep_image").get_attribute("title")
        seen["keep_image_mask_in_txt2img"] = page.locator(f"#{pid}ldg_keep_image_mask").is_visible()
        mask = page.locator(f"#{ipid}ldg_keep_image_mask")
        mask.locator("label", has_text="both").click()
        seen["keep_image_mask_in_img2img"] = mask.locator("input:checked").get_attribute("value")
        seen["keep_image_mask_title"] = mask.get_attribute("title")
        seen["tooltips"] = page.evaluate(TOOLTIPS)
        # A part of a slot that scrolls sideways: its content does not fit (a clipped radio).
        seen["scrolling_sideways"] = page.evaluate("""() => Array.from(
            document.querySelectorAll('#ldg-test-column .ldg-slot *')).filter(
            e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1
                 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX)
                 && e.tagName !== 'TEXTAREA').map(e => e.id || e.className)""")
        page.screenshot(path=screenshot("filled"), full_page=True)

        dropdown = page.locator(f"#{pid}ldg_preset")
        dropdown.locator("input").click()
        page.locator("ul.options li", has_text="Quality and art direction").first.click()
        page.wait_for_function(
            "() => document.querySelector('#%sldg_slot2_prompt textarea').value.length > 0" % pid)
        seen["after_preset"] = read_values(page)
        page.locator(f"#{pid}ldg_preset_name textarea").fill("browser test")
        page.click(f"#{pid}ldg_save")
        status = page.locator(".ldg-status", has_text="Saved").first  # gradio 3: on 2 nested divs
        status.wait_for()
        seen["save_status"] = status.inner_text().strip()
        seen["preset_after_save"] = dropdown.locator("input").input_value()
        page.locator("#ldg-test-column").screenshot(path=screenshot("light"))
        page.goto(url + "?__theme=dark")
        page.locator(f"#{pid}ldg").wait_for()
        page.locator(f"#{pid}ldg .label-wrap").first.click()
        page.locator(f"#{pid}ldg_slot1_prompt textarea").wait_for(state="visible")
        page.locator("#ldg-test-column").screenshot(path=screenshot("dark"))
        browser.close()
    seen["screenshots"] = [os.path.basename(screenshot(name))
                           for name in ("filled", "light", "dark")]
    return seen


def main():
    artifacts = sys.argv[1]
    os.makedirs(artifacts, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ldg-ui-data-") as data:
        os.environ["LDG_DATA_DIR"] = data  # the stand-in's --data-dir: saved presets go here
        demo, count = build_page()
        port = free_port()
        demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                            quiet=True, show_api=False)
        try:
            seen = drive(f"http://127.0.0.1:{port}/", artifacts)
        finally:
            demo.close()
    seen["argument_count"] = count
    seen["gradio"] = gr.__version__
    print("LDG-RESULT " + json.dumps(seen))


if __name__ == "__main__":
    main()
