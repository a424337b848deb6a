"""Run by the WebUI's launcher at every start, before the UI loads, with the WebUI's folder as
the working directory (A1111 modules/launch_utils.py run_extension_installer). Latent
Diffusion Guidance installs nothing: this only says, in one console line, when the WebUI it
was installed into is one it cannot serve, and what to use instead. It reads a few of the
WebUI's files as text (importing them would start the WebUI's own set-up) and never fails
the start.
"""
import os

SUPPORTED = "AUTOMATIC1111 WebUI 1.7 or newer, Forge, Forge Neo or reForge"


def _text(root, *path):
    try:
        with open(os.path.join(root, *path), encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return None


def problem(root):
    """Why this WebUI cannot run the extension, or None."""
    if os.path.isfile(os.path.join(root, "installer.py")) and os.path.isdir(
            os.path.join(root, "modules")):
        return (f"SD.Next is not supported (it samples through its own diffusers pipelines, "
                f"not the WebUI's CFG denoiser): use {SUPPORTED}")
    scripts = _text(root, "modules", "scripts.py")
    components = _text(root, "modules", "ui_components.py")
    if scripts is None or components is None:
        return None  # not a WebUI we know; say nothing rather than guess
    if "process_before_every_sampling" not in scripts or "class InputAccordion" not in components:
        return (f"this WebUI is older than the hooks and the accordion the extension needs "
                f"(A1111 1.7): update it, or use {SUPPORTED}")
    forge = _text(root, "backend", "sampling", "sampling_function.py")
    if forge is not None and "sampler_post_cfg_function" not in forge:
        return "this Forge has no post-CFG functions, which the extension needs: update Forge"
    reforge = _text(root, "ldm_patched", "modules", "samplers.py")
    if forge is None and reforge is not None and "def calc_cond_batch" not in reforge:
        return ("this Forge or reForge predates calc_cond_batch, which the extension needs: "
                "update it to reForge's main branch or to Forge")
    return None


def main():
    try:
        found = problem(os.getcwd())
    except Exception:  # never stop the WebUI from starting
        return
    if found:
        print(f"Latent Diffusion Guidance: {found}.")


main()
