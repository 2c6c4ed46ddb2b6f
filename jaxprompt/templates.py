"""Text templates for zero-shot CLIP and for prompt-learning teachers.

Pure data, no imports: the dataset catalog, the zero-shot method and PromptSRC's frozen teacher
all read from here, so a template list exists exactly once in the code base.

References:
  - CLIP's 80 ImageNet templates and the 7-template subset come from the prompt-engineering
    notebook of Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision" (arXiv 2103.00020), as copied by CoOp into ``trainers/imagenet_templates.py``.
  - The 60-template list is PromptSRC's "textual diversity" list (arXiv 2307.06948).
  - The per-dataset templates are CoOp's ``CUSTOM_TEMPLATES`` (arXiv 2109.01134).
"""

# CLIP's 80 ImageNet prompt templates, in the notebook's order ("a photo of a {}." at index 39).
IMAGENET_80: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# PromptSRC's teacher list: "a photo of a {}." first, then the first 60 of the 80 without it.
PROMPTSRC_60: tuple[str, ...] = ("a photo of a {}.",) + tuple(
    t for t in IMAGENET_80[:60] if t != "a photo of a {}."
)

# The 7-template subset CoOp's ZeroshotCLIP2 ensembles (plus the dataset's own template).
IMAGENET_SELECT_7: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# CoOp's hand-crafted zero-shot template per dataset (keyed by CoOp's dataset NAME).
COOP_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

# KgCoOp's hand-crafted prompt per dataset (its teacher): CoOp's table except DTD, where KgCoOp
# uses "a photo of a {}, a type of texture." (htyao89/KgCoOp, KgCoOp/trainers/kgcoop.py:37-53).
KGCOOP_TEMPLATES: dict[str, str] = {
    **COOP_TEMPLATES,
    "DescribableTextures": "a photo of a {}, a type of texture.",
}
# The same table keyed by CoOp's template, which is what a task carries (``Task.template``):
# equal CoOp templates have equal KgCoOp templates, so the mapping is well defined.
KGCOOP_FROM_COOP: dict[str, str] = {COOP_TEMPLATES[k]: v for k, v in KGCOOP_TEMPLATES.items()}
assert len({(COOP_TEMPLATES[k], v) for k, v in KGCOOP_TEMPLATES.items()}) == len(KGCOOP_FROM_COOP)

# Named template sets, for configs and the CLI (`zeroshot(templates="imagenet_80")`).
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "imagenet_80": IMAGENET_80,
    "promptsrc_60": PROMPTSRC_60,
    "imagenet_select_7": IMAGENET_SELECT_7,
}
