"""docs/concept-map-example.png: where each concept acted, on the toy model (a real, trained
model, so the map shows where a real concept acted). Run from the repository root with the test
environment: .venv/bin/python docs/make_concept_map_example.py"""
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, ".")
from ldg_core import Concept, GuidanceConfig, toy  # noqa: E402
from ldg_core.concept_maps import ConceptMapRecorder, batch_overlays  # noqa: E402

PROMPT, SIZE = "a large circle", 256
config = GuidanceConfig(concepts=[Concept("blue", scale=8, threshold=0.8, warmup=2),
                                  Concept("red", reverse=True, scale=8, threshold=0.8, warmup=2)],
                        momentum_scale=0.0)
pipe = toy.load()
plain = pipe.generate(PROMPT, seed=0)
recorder = ConceptMapRecorder()
_, guided = pipe.generate_latent(PROMPT, seed=0, guidance=config, observer=recorder.observe)
big = lambda image: np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.NEAREST))  # noqa: E731
panels = [(big(plain), "plain"), (big(guided), "guided")]
grey = np.repeat(big(guided).mean(-1, keepdims=True), 3, -1).astype(np.uint8)  # maps read better
for _, index, picture in batch_overlays([recorder], [grey]):
    concept = config.concepts[index]
    panels.append((picture, f"concept {index + 1}: {'remove' if concept.reverse else 'add'} "
                            f"'{concept.prompt}'"))
sheet = Image.new("RGB", (len(panels) * (SIZE + 8) - 8, SIZE), (255, 255, 255))
for column, (picture, label) in enumerate(panels):
    sheet.paste(Image.fromarray(picture), (column * (SIZE + 8), 0))
    ImageDraw.Draw(sheet).text((column * (SIZE + 8) + 4, 4), label, fill=(255, 255, 255),
                               stroke_width=2, stroke_fill=(0, 0, 0))
sheet.save("docs/concept-map-example.png", optimize=True)
