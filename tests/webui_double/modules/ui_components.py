"""modules/ui_components.py L88-144: InputAccordion is a (hidden) checkbox whose value is the
accordion's enabled state; `with` enters the accordion it creates."""
import gradio as gr


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        super().__init__(value=value, **{**kwargs, "visible": False})
        self.accordion = gr.Accordion(**{**kwargs, "open": value})
