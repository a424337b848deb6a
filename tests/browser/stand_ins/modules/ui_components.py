"""Stand-in for the WebUI's modules/ui_components.py InputAccordion (L88-144), for a page
without the WebUI's javascript: there, inputAccordion.js draws the enable checkbox into the
accordion's header; here the same checkbox (the component whose value the script receives)
is shown as the accordion's first row."""
import gradio as gr


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id") or "input-accordion"
        label = kwargs.pop("label", "Accordion")
        super().__init__(value=value, label="Enable", elem_id=f"{self.accordion_id}-checkbox",
                         render=False)
        self.accordion = gr.Accordion(label=label, open=value, elem_id=self.accordion_id,
                                      elem_classes=["input-accordion"])

    def __enter__(self):
        self.accordion.__enter__()
        self.render()
        return self

    def __exit__(self, *exc):
        return self.accordion.__exit__(*exc)

    def get_block_name(self):
        return "checkbox"
