"""A tiny text-to-image diffusion model of our own, shipped with its weights, to see and test
semantic guidance without downloading anything: `from ldg_core import toy; pipe = toy.load()`.
"""

from .pipeline import ToyPipeline, load

__all__ = ["ToyPipeline", "load"]
