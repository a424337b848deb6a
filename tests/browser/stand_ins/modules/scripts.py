"""Stand-in for modules/scripts.py: Script.elem_id as the WebUI builds it (L334-342; an
AlwaysVisible script shows in both tabs, so the tab name is part of the id)."""
import re

AlwaysVisible = object()
scripts_data = []


class Script:
    is_img2img = False

    def title(self):
        raise NotImplementedError

    def elem_id(self, item_id):
        tab = "img2img" if self.is_img2img else "txt2img"
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f"script_{tab}_{title}_{item_id}"
