"""A double of the parts of ComfyUI (Comfy-Org/ComfyUI a125cd84, 0.3.64) that our nodes use.
Our own code; each module cites the file and lines of ComfyUI it follows."""
