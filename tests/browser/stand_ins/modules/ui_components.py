"""Stand-in for the WebUI's modules/ui_components.py InputAccordion, following the host that
runs the gradio version in use:

- gradio 3.41.2 (A1111 1.10.1, reForge): A1111 1.10.1 modules/ui_components.py L88-162
  (read in kklouzal/stable-diffusion-webui): `class InputAccordion(gr.Checkbox)` whose
  `__init__(self, value, **kwargs)` makes the checkbox (elem_id "<id>-checkbox") and a
  gr.Accordion(label, open=value, elem_id=<id>, elem_classes=["input-accordion"]).
- gradio 4.40.0 (Forge, Forge Neo): lllyasviel/stable-diffusion-webui-forge
  modules/ui_components.py L102-170: the same, but `InputAccordion(value=None, **kwargs)` is a
  function returning `InputAccordionImpl(value=value, setup=True, **kwargs)`; without `setup`
  the class is a plain checkbox, because gradio 4 builds a component again from its
  constructor arguments when an event updates it (gradio/blocks.py, `block.__class__(**kwargs)`
  in postprocess_data), and that copy must not make a second accordion.

Both hosts hide that checkbox and their javascript (inputAccordion.js) draws a visible one into
the accordion's header. This page has no WebUI javascript, so the checkbox itself (the component
whose value the script receives) is shown as the accordion's first row, labelled "Enable".
"""
from functools import wraps

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def _accordion(value, kwargs):
    return gr.Accordion(label=kwargs.get("label", "Accordion"), open=value,
                        elem_id=kwargs.get("elem_id") or "input-accordion",
                        elem_classes=["input-accordion"])


def _checkbox_kwargs(accordion_id, kwargs):
    # The real ones pass **kwargs on with visible=False; here: visible, labelled, and rendered
    # inside the accordion (see __enter__).
    rest = {k: v for k, v in kwargs.items() if k not in ("elem_id", "label", "visible")}
    return {**rest, "label": "Enable", "elem_id": f"{accordion_id}-checkbox", "render": False}


class _Entering:
    def __enter__(self):
        self.accordion.__enter__()
        self.render()
        return self

    def __exit__(self, *exc):
        return self.accordion.__exit__(*exc)

    def get_block_name(self):
        return "checkbox"


if GRADIO_MAJOR < 4:
    class InputAccordion(_Entering, gr.Checkbox):
        def __init__(self, value, **kwargs):
            self.accordion_id = kwargs.get("elem_id") or "input-accordion"
            super().__init__(value, **_checkbox_kwargs(self.accordion_id, kwargs))
            self.accordion = _accordion(value, kwargs)
else:
    import gradio.component_meta

    # Forge's modules/gradio_extensions.py L97-105: gradio 4 writes a .pyi stub next to the
    # source of every component class it sees (component_meta.create_or_modify_pyi); Forge skips
    # the classes that carry this flag, so no stub is written into this folder either.
    _write_stub = gradio.component_meta.create_or_modify_pyi

    def _stub_unless_flagged(component_class, *args):
        if not hasattr(component_class, "webui_do_not_create_gradio_pyi_thank_you"):
            _write_stub(component_class, *args)
    gradio.component_meta.create_or_modify_pyi = _stub_unless_flagged

    class InputAccordionImpl(_Entering, gr.Checkbox):
        webui_do_not_create_gradio_pyi_thank_you = True

        # gradio 4 sends a component's config from the attributes its __init__ signature names
        # (blocks.py Block.get_config); Forge's @wraps (L112) makes that Checkbox's signature.
        @wraps(gr.Checkbox.__init__)
        def __init__(self, value=None, setup=False, **kwargs):
            if not setup:
                super().__init__(value=value, **kwargs)
                return
            self.accordion_id = kwargs.get("elem_id") or "input-accordion"
            super().__init__(value=value, **_checkbox_kwargs(self.accordion_id, kwargs))
            self.accordion = _accordion(value, kwargs)

    def InputAccordion(value=None, **kwargs):
        return InputAccordionImpl(value=value, setup=True, **kwargs)
