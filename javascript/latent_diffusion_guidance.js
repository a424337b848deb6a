// Latent Diffusion Guidance: one-line tooltips for the accordion's controls. Each control
// carries a class "ldg-<field>" (see scripts/latent_diffusion_guidance.py); its block gets the
// text below as its title, so hovering anywhere on the control shows it.
(function() {
    var tips = {
        "ldg-preset": "Fill the slots with ready-made settings for a common task; edit them after.",
        "ldg-preset-name": "Name under which the current slots are saved as your own preset.",
        "ldg-save": "Save the current slots and momentum as a preset of your own (kept across updates).",
        "ldg-momentum-scale": "How much of the running average of earlier pushes is added to each step's push; 0 turns momentum off.",
        "ldg-momentum-beta": "How much of that running average is kept from one step to the next (0 to 1).",
        "ldg-concept-maps": "After generation, add one heatmap per concept showing where it acted (not saved unless you save it).",
        "ldg-slot_enabled": "Use this concept; an unticked or empty slot is ignored.",
        "ldg-prompt": "The concept's text, with the full prompt syntax; the whole text is one concept, commas included.",
        "ldg-direction": "add pushes the image toward the concept, remove pushes it away.",
        "ldg-scale": "How hard the concept pushes.",
        "ldg-threshold": "Keep only the strongest part of the push: 0.9 acts on the top 10 % of the latent, 0 everywhere.",
        "ldg-warmup": "Sampling steps before the concept starts to act (it keeps the composition when high).",
        "ldg-cooldown": "Step from which the concept stops acting; -1 means never.",
        "ldg-weight": "Weight of this concept against the others.",
        "ldg-sld-enabled": "Safe Latent Diffusion: steer away from the safety concept, as the SLD paper's method does; adds to the concepts above.",
        "ldg-sld-config": "One of SLD's four configurations (weak, medium, strong, max), or custom to use the numbers below.",
        "ldg-sld-concept": "What to steer away from; SLD's own text by default. Edit it to remove something else.",
        "ldg-sld-scale": "SLD guidance scale (20 to 5000 in SLD's configurations); 1 or less turns SLD off.",
        "ldg-sld-threshold": "SLD steers only where the prompt's estimate minus the safety concept's is below this.",
        "ldg-sld-warmup": "Sampling steps before SLD is applied (its momentum builds up meanwhile).",
        "ldg-sld-momentum-scale": "How much of SLD's running average of earlier steers is added to each step's; 0 turns it off.",
        "ldg-sld-momentum-beta": "How much of SLD's running average is kept from one step to the next (0 to 1).",
        "ldg-keep-image": "img2img: invert the image first (LEDITS++), so that without concepts it comes back unchanged and concepts change only what they touch. DDIM or DPM++ 2M SDE.",
        "ldg-keep-image-mask": "Where kept-image concepts act: noise, where their push is strongest; attention, where their words attend in the UNet; both, where the two meet (LEDITS++'s default)."
    };

    function apply() {
        for (var name in tips) {
            var nodes = document.querySelectorAll("." + name);
            for (var i = 0; i < nodes.length; i++) {
                if (!nodes[i].title) nodes[i].title = tips[name];
            }
        }
    }

    if (typeof onUiUpdate === "function") {
        onUiUpdate(apply);  // the WebUI's hook, called whenever the page changes
    } else {
        new MutationObserver(apply).observe(document.documentElement, {childList: true, subtree: true});
        document.addEventListener("DOMContentLoaded", apply);
    }
})();
