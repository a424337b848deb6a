"""Run from the repository root with the test environment (.venv/bin/python docs/make_concept_map_example.py).

docs/concept-map-example.png: synthetic estimates where the concept differs from the negative
prompt's estimate mostly around the eyes of a drawn face; 20 steps through SemanticGuidance with
the concept-map recorder, laid over the drawing."""
import sys, numpy as np, torch
sys.path.insert(0, ".")
from PIL import Image, ImageDraw
from ldg_core import Concept, GuidanceConfig, SemanticGuidance
from ldg_core.concept_maps import ConceptMapRecorder, batch_overlays
size = 256
face = Image.new("RGB", (size, size), (225, 230, 235)); d = ImageDraw.Draw(face)
d.ellipse((48, 28, 208, 228), fill=(240, 200, 170), outline=(90, 60, 40), width=3)
for x in (96, 160):
    d.ellipse((x - 14, 100, x + 14, 122), fill=(255, 255, 255), outline=(40, 40, 40), width=2)
    d.ellipse((x - 5, 106, x + 5, 116), fill=(40, 40, 40))
d.arc((92, 150, 164, 196), 20, 160, fill=(150, 40, 40), width=4)
torch.manual_seed(0)
region = torch.zeros(1, 1, 32, 32); region[..., 11:17, 7:25] = 1.0  # the eyes, in latent cells
config = GuidanceConfig(concepts=[Concept("glasses", scale=5, threshold=0.9, warmup=4)])
recorder = ConceptMapRecorder()
guidance = SemanticGuidance(config, observer=recorder.observe)
for step in range(20):
    uncond = torch.randn(1, 4, 32, 32)
    concept = uncond + 0.3 * torch.randn(1, 4, 32, 32) + region * (0.6 + 0.4 * torch.rand(1, 4, 1, 1))
    guidance.step(step=step, uncond=uncond, cond=uncond, concepts=concept[None])
(_, _, picture), = batch_overlays([recorder], [np.asarray(face)])
both = Image.new("RGB", (2 * size + 8, size), (255, 255, 255))
both.paste(face, (0, 0)); both.paste(Image.fromarray(picture), (size + 8, 0))
ImageDraw.Draw(both).text((size + 12, 4), "concept 1: add 'glasses'", fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
both.save("docs/concept-map-example.png", optimize=True)
