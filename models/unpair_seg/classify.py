"""Open-vocabulary classification of region embeddings against template-expanded class names (spec §6, §11.9).

* :func:`text_classifier`: class names -> prompts (:func:`models.unpair_seg.templates.expand`) -> the CLIP text tower
  (``backbone.get_text_classifier``, un-normalised) -> L2-normalised rows ``[T, D]`` plus ``num_templates`` (prompts
  per class, consecutive blocks).
* :func:`fcclip_logits`: the official ``get_classification_logits_fcclip``: L2-normalise the region embeddings
  ``x`` only (the text must already be unit rows), cosine logits ``x @ text^T``, the **max** over each class's block
  of prompts (OpenSeg/ODISE max ensemble), then times ``clamp(exp(logit_scale), max=100)`` when a logit scale is
  given. A class's block covers all its synonyms and all templates, so "max over templates" is also the max over
  synonyms.

FC-CLIP itself averages the normalised embeddings of a synonym's templates (then re-normalises) and takes the max only
over synonyms; :func:`text_classifier` offers that as ``ensemble="mean"`` (``num_templates`` then counts synonyms).
The default ``"max"`` is the Unpair-Seg function as released.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from models.unpair_seg.templates import VILD, ClassNames, class_synonyms, expand, get_templates

LOGIT_SCALE_MAX = 100.0


@torch.no_grad()
def text_classifier(backbone, class_names: ClassNames, templates: Union[str, Sequence[str]] = VILD,
                    batch: int = 128, ensemble: str = "max") -> tuple[Tensor, list[int]]:
    """Unit text embeddings of every prompt of every class.

    Args:
        backbone: a :class:`models.unpair_seg.backbone.CLIPBackbone` (anything with
            ``get_text_classifier(list[str]) -> [n, D]``, un-normalised).
        class_names: one entry per class (str with comma-separated synonyms, or a sequence of synonyms).
        templates: a template set name or format strings (default VILD, 14).
        batch: prompts per text-tower call (bounds memory for ADE-847 x 14 = 11,858 prompts).
        ensemble: ``"max"`` (official: one row per prompt; the max over the class's block happens in
            :func:`fcclip_logits`) or ``"mean"`` (FC-CLIP: the mean of a synonym's normalised template embeddings,
            re-normalised, one row per synonym).

    Returns: ``(text [T, D] float32 unit rows, num_templates)`` with ``sum(num_templates) == T``, classes in order;
    on the backbone's device.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"text_classifier: 'batch' must be an int >= 1, got {batch!r}")
    if ensemble not in ("max", "mean"):
        raise ValueError(f"text_classifier: 'ensemble' must be 'max' or 'mean', got {ensemble!r}")
    if not callable(getattr(backbone, "get_text_classifier", None)):
        raise TypeError(f"text_classifier: 'backbone' must have get_text_classifier(texts), got "
                        f"{type(backbone).__name__}")
    templates = get_templates(templates)
    prompts, num_templates = expand(class_names, templates)
    rows = []
    for i in range(0, len(prompts), batch):
        emb = backbone.get_text_classifier(prompts[i:i + batch])
        if not isinstance(emb, Tensor) or emb.ndim != 2 or emb.shape[0] != len(prompts[i:i + batch]):
            raise ValueError(f"text_classifier: backbone.get_text_classifier must return [n, D] for n texts, got "
                             f"{getattr(emb, 'shape', type(emb).__name__)}")
        rows.append(emb.float())
    text = F.normalize(torch.cat(rows, 0), dim=-1)
    if ensemble == "mean":
        t = len(templates)
        text = F.normalize(text.reshape(-1, t, text.shape[-1]).mean(1), dim=-1)
        num_templates = [len(s) for s in class_synonyms(class_names)]
    return text, num_templates


def fcclip_logits(x: Tensor, text: Tensor, logit_scale: Optional[Union[Tensor, float]] = None,
                  num_templates: Optional[Sequence[int]] = None) -> Tensor:
    """Class logits of region embeddings: the official ``get_classification_logits_fcclip``.

    Args:
        x: region embeddings [B, Q, D] (any scale; L2-normalised here).
        text: text classifier [T, D], rows already unit (not normalised here, as officially).
        logit_scale: the CLIP ``logit_scale`` parameter (a log: the factor is ``clamp(exp(logit_scale), max=100)``),
            a 0-d tensor or a float; None returns the max cosines unscaled.
        num_templates: rows per class (consecutive blocks of ``text``); must sum to T. None: one row per class.

    Returns: [B, Q, K] with K = ``len(num_templates)``, in x's dtype promoted with text's.
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise ValueError(f"fcclip_logits: 'x' must be a tensor [B, Q, D], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(text, Tensor) or text.ndim != 2 or text.shape[1] != x.shape[2]:
        raise ValueError(f"fcclip_logits: 'text' must be a tensor [T, D] with D = {x.shape[2]} (x's width), got "
                         f"{tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__}")
    if not x.is_floating_point() or not text.is_floating_point():
        raise TypeError(f"fcclip_logits: 'x' and 'text' must be floating tensors, got {x.dtype} and {text.dtype}")
    t = text.shape[0]
    if num_templates is None:
        counts = [1] * t
    else:
        counts = [int(n) for n in num_templates]
        if not counts or any(isinstance(n, bool) or n < 1 for n in counts) or sum(counts) != t:
            raise ValueError(f"fcclip_logits: 'num_templates' must be positive ints summing to T = {t} (text rows), "
                             f"got {len(counts)} entries summing to {sum(counts)}")
    logits = F.normalize(x, dim=-1) @ text.to(x.device).transpose(0, 1)  # [B, Q, T]
    if all(n == counts[0] for n in counts):
        # Equal blocks (every class with the same synonym count): one reshape instead of K slices.
        out = logits.reshape(*logits.shape[:2], len(counts), counts[0]).amax(-1)
    else:
        out = torch.stack([blk.amax(-1) for blk in torch.split(logits, counts, dim=-1)], dim=-1)
    if logit_scale is not None:
        scale = torch.as_tensor(logit_scale, dtype=out.dtype, device=out.device)
        if scale.numel() != 1:
            raise ValueError(f"fcclip_logits: 'logit_scale' must be a scalar, got shape {tuple(scale.shape)}")
        out = out * torch.clamp(scale.reshape(()).exp(), max=LOGIT_SCALE_MAX)
    return out
