"""ComfyUI's entry point: ComfyUI imports this folder as a package from custom_nodes/, after its
own sampling modules. The WebUI loads scripts/ instead; elsewhere (the tests' collection)
there are no nodes to load."""

import sys

if "comfy.samplers" in sys.modules:
    from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
