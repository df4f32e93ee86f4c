"""Prompt templates for zero-shot classification: OpenAI CLIP's ImageNet sets, as plain data.

A template is a string with exactly one "{}" where the class name goes: "a photo of a {}.".
"""
from typing import Sequence, Tuple, Union

# The 80 templates of OpenAI CLIP's notebooks/Prompt_Engineering_for_ImageNet.ipynb (the same
# list, in the same order, as open_clip's OPENAI_IMAGENET_TEMPLATES).
IMAGENET_TEMPLATES: Tuple[str, ...] = (
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

# The 7-template subset the same notebook found best by sequential forward selection on ImageNet
# (about as good as all 80, at a tenth of the text encoding).
IMAGENET_TEMPLATES_SHORT: Tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATES = {
    "imagenet80": IMAGENET_TEMPLATES,
    "imagenet7": IMAGENET_TEMPLATES_SHORT,
    "photo": ("a photo of a {}.",),
}
DEFAULT = "imagenet7"


def _check(template: str, where: str) -> str:
  if not isinstance(template, str):
    raise TypeError(f"{where}: expected a template string with one '{{}}'; found "
                    f"{type(template).__name__} {template!r}.")
  # Exactly one "{}" and no other braces, so `template.format(classname)` is the whole contract.
  if template.count("{}") != 1 or template.replace("{}", "").count("{") or \
      template.replace("{}", "").count("}"):
    raise ValueError(f"{where}: expected exactly one '{{}}' (the class name) and no other "
                     f"braces; found {template!r}.")
  return template


def get_templates(name_or_list: Union[str, Sequence[str]] = DEFAULT) -> Tuple[str, ...]:
  """A set name ("imagenet80", "imagenet7", "photo"), one template ("a photo of a {}."), or a
  list of templates -> a validated tuple of templates."""
  if isinstance(name_or_list, str):
    if name_or_list in TEMPLATES:
      return TEMPLATES[name_or_list]
    if "{}" in name_or_list:
      return (_check(name_or_list, "template"),)
    raise ValueError(f"Prompt templates {name_or_list!r}: expected one of {sorted(TEMPLATES)}, "
                     f"a template containing '{{}}', or a list of templates.")
  templates = tuple(_check(t, f"templates[{i}]") for i, t in enumerate(name_or_list))
  if not templates:
    raise ValueError("Prompt templates: expected at least one template; found an empty list.")
  return templates
