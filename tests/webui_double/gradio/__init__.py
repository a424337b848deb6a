"""Just enough of gradio 3.41 for the script's ui() to build: components record their
arguments and event handlers, layout blocks are context managers, update() is gradio 3's dict."""


class _Block:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.value = kwargs.get("value", args[0] if args else None)
        self.visible = kwargs.get("visible", True)
        self.events = []  # (event, fn, inputs, outputs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _event(name):
        def listen(self, fn=None, inputs=None, outputs=None, **kwargs):
            self.events.append((name, fn, inputs, outputs))
        return listen

    change = _event("change")
    click = _event("click")
    input = _event("input")


Accordion = Row = Column = Group = Blocks = _Block
Checkbox = Number = Slider = Textbox = Radio = Dropdown = Button = Markdown = HTML = _Block


def update(**kwargs):
    """gradio 3.41 gr.update (components/base.py): a plain dict marked as an update."""
    return {"__type__": "update", **kwargs}
