"""Just enough of gradio 3.41 for the script's ui() to build: components record their
arguments, layout blocks are context managers."""


class _Block:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        self.value = kwargs.get("value")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


Accordion = Row = Column = Group = Blocks = _Block
Checkbox = Number = Slider = Textbox = Radio = Dropdown = Button = Markdown = HTML = _Block
