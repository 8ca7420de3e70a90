"""Prompt templates and class names for zero-shot classification.

Two template sets ship with the package: the 7 short ImageNet prompts FLIP evaluates with and
OpenAI's 80 ImageNet prompts (CLIP's prompt-engineering notebook; OpenCLIP's
`OPENAI_IMAGENET_TEMPLATES`, in the same order). Any other set is a file, one template per line,
each holding `{}` where the class name goes.
"""

from __future__ import annotations

from pathlib import Path

# The 7 short ImageNet prompts FLIP evaluates with (a subset of OpenAI's 80).
FLIP_SHORT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# OpenAI's 80 ImageNet prompts, in the order of CLIP's notebook.
OPENAI_IMAGENET_TEMPLATES = (
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

TEMPLATE_SETS = {"flip_short": FLIP_SHORT_TEMPLATES, "openai": OPENAI_IMAGENET_TEMPLATES}


def load_templates(setting: str) -> list[str]:
    """A named template set (`flip_short`, `openai`) or a file with one template per line, each holding `{}`."""
    if setting in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[setting])
    path = Path(setting)
    if not path.is_file():
        raise FileNotFoundError(
            f"eval.templates: '{setting}' is neither a template set ({', '.join(TEMPLATE_SETS)}) nor a file"
        )
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"eval.templates file {path}: every line needs a '{{}}' for the class name; bad lines: {bad[:3]}")
    return templates


def load_classnames(path: str) -> list[str]:
    """Class names, one per line, in class-index order."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"eval.classnames: no file at '{path}' (one class name per line)")
    names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"eval.classnames: {path} holds no class names")
    return names
