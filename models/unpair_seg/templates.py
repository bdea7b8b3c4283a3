"""Prompt templates for open-vocabulary classification (spec §6, the official ``lib/utils/prompt.py``) and the
expansion of class names into prompts.

Each template is a format string with one ``{}`` for the class name. The four sets, in the official order:

* :data:`SIMPLE` (5): the plain ViLD phrasings ("a photo of a {}.", ..., "a photo of a {} in the scene").
* :data:`VILD` (14): SIMPLE plus the small / medium / large variants (FC-CLIP's ``VILD_PROMPT``; our default, since
  stage 2 is unreleased and the FC-CLIP lineage uses it).
* :data:`OPENAI_IMAGENET` (81): OpenAI's 80 ImageNet templates with "a photo of a {}." first, as officially, so that
  it appears twice (entries 0 and 40).
* :data:`OPENAI_IMAGENET_VILD` (94): VILD followed by OPENAI_IMAGENET without its first entry, so "a photo of a {}."
  (2x), "a photo of a large {}." and "a photo of a small {}." occur twice, as officially.

Duplicates are kept on purpose: with the max-over-templates ensemble (:func:`models.unpair_seg.classify.fcclip_logits`)
they change nothing, with a mean ensemble they weight a phrasing twice, exactly as the official lists would.

Class names: a name may carry synonyms separated by commas (``"person, child, girl"``, the convention of the
detectron2 ADE-847 / PASCAL-Context-459 class lists and FC-CLIP's ``split_labels``); each synonym is expanded with every
template, and all of them belong to the class.
"""

from __future__ import annotations

from typing import Sequence, Union

SIMPLE: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
)

VILD: tuple[str, ...] = SIMPLE + (
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

OPENAI_IMAGENET: tuple[str, ...] = (
    "a photo of a {}.",
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

OPENAI_IMAGENET_VILD: tuple[str, ...] = VILD + OPENAI_IMAGENET[1:]

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": SIMPLE,
    "vild": VILD,
    "openai_imagenet": OPENAI_IMAGENET,
    "openai_imagenet_vild": OPENAI_IMAGENET_VILD,
}

ClassNames = Sequence[Union[str, Sequence[str]]]


def get_templates(name_or_templates: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """A template set by name (a key of :data:`TEMPLATE_SETS`, case-insensitive) or a checked sequence of format
    strings, each with exactly one ``{}``."""
    if isinstance(name_or_templates, str):
        key = name_or_templates.lower()
        if key not in TEMPLATE_SETS:
            raise ValueError(f"get_templates: unknown template set {name_or_templates!r}; expected one of "
                             f"{tuple(TEMPLATE_SETS)} or a sequence of format strings")
        return TEMPLATE_SETS[key]
    try:
        templates = tuple(name_or_templates)
    except TypeError:
        raise TypeError(f"get_templates: expected a set name or a sequence of format strings, got "
                        f"{type(name_or_templates).__name__}") from None
    if not templates:
        raise ValueError("get_templates: 'templates' is empty")
    for t in templates:
        if not isinstance(t, str):
            raise TypeError(f"get_templates: every template must be a str, got {type(t).__name__}")
        if t.count("{}") != 1 or t.replace("{}", "").count("{") or t.replace("{}", "").count("}"):
            raise ValueError(f"get_templates: every template must hold exactly one '{{}}' and no other braces, "
                             f"got {t!r}")
    return templates


def split_synonyms(name: str) -> list[str]:
    """``"person, child,girl"`` -> ``["person", "child", "girl"]``: comma-separated synonyms, stripped, empty parts
    dropped (FC-CLIP's ``split_labels``, which also tolerates a missing space after the comma)."""
    if not isinstance(name, str):
        raise TypeError(f"split_synonyms: 'name' must be a str, got {type(name).__name__}")
    parts = [p.strip() for p in name.split(",")]
    parts = [p for p in parts if p]
    if not parts:
        raise ValueError(f"split_synonyms: class name {name!r} holds no name")
    return parts


def class_synonyms(class_names: ClassNames) -> list[list[str]]:
    """Each class's synonym list. A class is a str (comma-separated synonyms) or a sequence of str (taken as the
    synonyms, each stripped)."""
    if isinstance(class_names, str):
        raise TypeError("class_synonyms: 'class_names' must be a sequence of class names, got a single str")
    try:
        items = list(class_names)
    except TypeError:
        raise TypeError(f"class_synonyms: 'class_names' must be a sequence, got {type(class_names).__name__}") from None
    if not items:
        raise ValueError("class_synonyms: 'class_names' is empty")
    out = []
    for k, c in enumerate(items):
        if isinstance(c, str):
            out.append(split_synonyms(c))
        else:
            try:
                syn = [s.strip() for s in c]
            except (TypeError, AttributeError):
                raise TypeError(f"class_synonyms: class {k} must be a str or a sequence of str, got {c!r}") from None
            if not syn or not all(syn):
                raise ValueError(f"class_synonyms: class {k} has an empty synonym list or an empty name: {c!r}")
            out.append(syn)
    return out


def expand(class_names: ClassNames, templates: Union[str, Sequence[str]] = VILD) -> tuple[list[str], list[int]]:
    """Prompts for every class, synonym and template, and the number of prompts of each class.

    Order (the layout :func:`models.unpair_seg.classify.fcclip_logits` expects): classes in order; within a class its
    synonyms in order; within a synonym the templates in order. So class ``k`` owns the consecutive block of
    ``num_templates[k] = len(synonyms_k) * len(templates)`` prompts starting at ``sum(num_templates[:k])``.

    Args:
        class_names: one entry per class: a str (comma-separated synonyms) or a sequence of synonyms.
        templates: a set name (``"vild"``, ...) or format strings with one ``{}``.

    Returns: ``(prompts, num_templates)``, ``len(prompts) == sum(num_templates)``.
    """
    templates = get_templates(templates)
    prompts, counts = [], []
    for synonyms in class_synonyms(class_names):
        for name in synonyms:
            prompts.extend(t.format(name) for t in templates)
        counts.append(len(synonyms) * len(templates))
    return prompts, counts
