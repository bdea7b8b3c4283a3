"""Mask-entity matching and the alignment loss (thesis eqs. 3.6 and 3.8; spec §11.4, §11.5, §11.7).

Regions ``r`` [Q, E] (frozen multi-scale CLIP region embeddings of the mask proposals, region.py) and entities
``t`` [T, E] (CLIP text embeddings of the caption's entities) are compared by cosine similarity
``c_ik = r_i . t_k / (|r_i| |t_k|)``. Eq. 3.6 then reads "the cost is the row softmax of (1 - cos)", which is
ambiguous (spec §11.4: a softmax of a *distance* used as a cost to minimise is unusual, and neither its axis nor a
temperature is given). Both readings are implemented; the choice is :class:`MatchConfig`:

* ``cost="prob"`` (default): the matching probability ``p_ik = softmax(c_ik / tau)``, with the softmax over
  ``axis``, and the cost ``1 - p_ik``. ``tau`` defaults to 0.01, i.e. CLIP's logit scale at its clamp (100), the
  scale at which CLIP's own classifiers turn cosines into probabilities.
* ``cost="literal"``: eq. 3.6 as printed, ``softmax(1 - c_ik)`` over ``axis`` (no temperature) as the cost. It is
  monotone in the distance along its axis, so it ranks pairs like the distance does, but its values (near 1/T) are
  no probabilities; the confidence below is the same ``p_ik`` in both cases.

``axis="entities"`` (default) is the row softmax of eq. 3.6 (the sum runs over the entity index ``j``): each mask's
distribution over the caption's entities. ``axis="regions"`` normalises each entity over the masks instead.

Matching: a one-to-one assignment of minimum total cost between masks and entities (Hungarian,
``scipy.optimize.linear_sum_assignment``; ``min(Q, T)`` pairs) — the thesis' "bipartite" variant, better than
greedy in its Table 3.7. A pair is **confident** when its probability ``p_ik >= threshold`` (default 0.7, the
official config's ``MATCHER_THRES_POS``); only confident pairs are supervised.

Multi-scale matching (:func:`match_multiscale`): ``ensemble="embedding"`` (default, the thesis' r-hat =
sum_s r_s / S, re-normalised) matches on the averaged embedding; ``ensemble="cost"`` averages the per-scale costs
and probabilities instead (spec §11.3 notes both readings).

Loss (eq. 3.8): the mean of ``1 - cos(r'_i, t_k)`` over the confident pairs (of a whole batch: pairs from every
image count equally), with ``r'`` the adapted region embeddings. Without any confident pair the loss is a zero that
is still connected to ``r'`` (``0 * sum(r')``), so every parameter receives a (zero) gradient and data-parallel
gradient reduction stays in step across processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MatchConfig", "Match", "cosine_similarity", "match_probabilities", "cost_matrix", "hungarian",
           "match", "match_multiscale", "cosine_alignment_loss", "batch_loss", "COSTS", "AXES", "ENSEMBLES"]

COSTS = ("prob", "literal")
AXES = ("entities", "regions")
ENSEMBLES = ("embedding", "cost")


@dataclass(frozen=True)
class MatchConfig:
    """Matching settings (module docstring): cost ("prob" | "literal"), axis of the softmax ("entities" | "regions"),
    temperature tau of the probabilities (> 0), confidence threshold in [0, 1], multi-scale ensemble ("embedding" |
    "cost")."""

    cost: str = "prob"
    axis: str = "entities"
    temperature: float = 0.01
    threshold: float = 0.7
    ensemble: str = "embedding"

    def __post_init__(self):
        for name, allowed in (("cost", COSTS), ("axis", AXES), ("ensemble", ENSEMBLES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MatchConfig: '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"MatchConfig: 'temperature' must be a finite number > 0, got {t!r}")
        h = self.threshold
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0.0 <= h <= 1.0:
            raise ValueError(f"MatchConfig: 'threshold' must be in [0, 1], got {h!r}")


class Match(NamedTuple):
    """Confident pairs of one image: ``regions`` int64 [P] (mask indices), ``entities`` int64 [P] (entity indices),
    ``confidence`` float [P] (their probabilities), sorted by mask index."""

    regions: torch.Tensor
    entities: torch.Tensor
    confidence: torch.Tensor


def _check_embeddings(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"alignment: '{name}' must be a float tensor [n, E], got "
                         f"{getattr(x, 'shape', type(x).__name__)}")


def cosine_similarity(regions: torch.Tensor, entities: torch.Tensor) -> torch.Tensor:
    """[Q, E] x [T, E] -> [Q, T] cosines (fp32; zero vectors give 0)."""
    _check_embeddings("regions", regions)
    _check_embeddings("entities", entities)
    if regions.shape[1] != entities.shape[1]:
        raise ValueError(f"alignment: 'regions' and 'entities' must have the same width, got {regions.shape[1]} and "
                         f"{entities.shape[1]}")
    return F.normalize(regions.float(), dim=-1) @ F.normalize(entities.float(), dim=-1).T


def _dim(axis: str) -> int:
    if axis not in AXES:
        raise ValueError(f"alignment: 'axis' must be one of {AXES}, got {axis!r}")
    return 1 if axis == "entities" else 0


def match_probabilities(cos: torch.Tensor, axis: str = "entities", temperature: float = 0.01) -> torch.Tensor:
    """``softmax(cos / temperature)`` over ``axis`` of a [Q, T] cosine matrix."""
    return torch.softmax(cos / float(temperature), dim=_dim(axis))


def cost_matrix(cos: torch.Tensor, cost: str = "prob", axis: str = "entities",
                temperature: float = 0.01) -> torch.Tensor:
    """The [Q, T] matching cost of a cosine matrix (module docstring): ``1 - softmax(cos / temperature)`` ("prob")
    or ``softmax(1 - cos)`` ("literal", eq. 3.6), the softmax over ``axis``."""
    if cost == "prob":
        return 1.0 - match_probabilities(cos, axis, temperature)
    if cost == "literal":
        return torch.softmax(1.0 - cos, dim=_dim(axis))
    raise ValueError(f"alignment: 'cost' must be one of {COSTS}, got {cost!r}")


def hungarian(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of a [Q, T] cost matrix (rectangular allowed): (rows, cols) int64 [P],
    P = min(Q, T), rows ascending. Non-finite costs raise ValueError."""
    if not isinstance(cost, torch.Tensor) or cost.dim() != 2:
        raise ValueError(f"hungarian: 'cost' must be a tensor [Q, T], got "
                         f"{getattr(cost, 'shape', type(cost).__name__)}")
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=cost.device)
        return empty, empty.clone()
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise ValueError("hungarian: 'cost' must be finite")
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(c)
    return (torch.as_tensor(rows, dtype=torch.int64, device=cost.device),
            torch.as_tensor(cols, dtype=torch.int64, device=cost.device))


def _valid_index(valid: Optional[torch.Tensor], q: int, device) -> Optional[torch.Tensor]:
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor) or valid.shape != (q,) or valid.dtype != torch.bool:
        raise ValueError(f"alignment: 'valid' must be a bool tensor [{q}], got "
                         f"{getattr(valid, 'shape', None)} {getattr(valid, 'dtype', type(valid).__name__)}")
    return torch.arange(q, device=device)[valid.to(device)]


def _assign(cos: list[torch.Tensor], config: MatchConfig, index: Optional[torch.Tensor]) -> Match:
    """Hungarian + threshold on the mean over ``cos`` (one [Q', T] matrix per scale) of the probabilities and costs;
    row indices mapped back through ``index``."""
    prob = torch.stack([match_probabilities(c, config.axis, config.temperature) for c in cos]).mean(0)
    cost = torch.stack([cost_matrix(c, config.cost, config.axis, config.temperature) for c in cos]).mean(0)
    rows, cols = hungarian(cost)
    conf = prob[rows, cols]
    keep = conf >= config.threshold
    rows, cols, conf = rows[keep], cols[keep], conf[keep]
    return Match(rows if index is None else index[rows], cols, conf)


def match(regions: torch.Tensor, entities: torch.Tensor, config: MatchConfig = MatchConfig(),
          valid: Optional[torch.Tensor] = None) -> Match:
    """Confident mask-entity pairs of one image (module docstring).

    Args:
        regions: [Q, E] region embeddings; entities: [T, E] entity embeddings (any norm; compared by cosine).
        config: the matching settings.
        valid: optional bool [Q]: only these masks take part (the padding of a batch never enters a softmax);
            the returned indices refer to the rows of ``regions``.
    """
    _check_embeddings("regions", regions)
    index = _valid_index(valid, regions.shape[0], regions.device)
    r = regions if index is None else regions[index]
    return _assign([cosine_similarity(r, entities)], config, index)


def match_multiscale(per_scale: torch.Tensor, entities: torch.Tensor, config: MatchConfig = MatchConfig(),
                     valid: Optional[torch.Tensor] = None) -> Match:
    """Confident pairs from per-scale region embeddings [S, Q, E] (module docstring, ``config.ensemble``:
    "embedding" matches the re-normalised mean of the unit per-scale embeddings, "cost" averages the per-scale
    probabilities and costs)."""
    if not isinstance(per_scale, torch.Tensor) or per_scale.dim() != 3 or not per_scale.is_floating_point():
        raise ValueError(f"match_multiscale: 'per_scale' must be a float tensor [S, Q, E], got "
                         f"{getattr(per_scale, 'shape', type(per_scale).__name__)}")
    if per_scale.shape[0] == 0:
        raise ValueError("match_multiscale: 'per_scale' has no scale")
    index = _valid_index(valid, per_scale.shape[1], per_scale.device)
    r = per_scale if index is None else per_scale[:, index]
    unit = F.normalize(r.float(), dim=-1)
    if config.ensemble == "embedding":
        return _assign([cosine_similarity(F.normalize(unit.mean(0), dim=-1), entities)], config, index)
    return _assign([cosine_similarity(u, entities) for u in unit], config, index)


def cosine_alignment_loss(adapted: torch.Tensor, entities: torch.Tensor,
                          region_index: Optional[torch.Tensor] = None,
                          entity_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 3.8 averaged over pairs: ``mean_p (1 - cos(adapted[region_index[p]], entities[entity_index[p]]))``.

    Args:
        adapted: [Q, E] adapted region embeddings (differentiable).
        entities: [T, E] entity embeddings (targets; no gradient is taken through them).
        region_index, entity_index: int64 [P] pair indices; both None means the rows are already paired
            (``adapted[p]`` with ``entities[p]``, Q == T).

    Returns a 0-dim fp32 tensor; with P == 0 a zero connected to ``adapted`` (module docstring).
    """
    _check_embeddings("adapted", adapted)
    _check_embeddings("entities", entities)
    if (region_index is None) != (entity_index is None):
        raise ValueError("cosine_alignment_loss: give both 'region_index' and 'entity_index', or neither")
    if region_index is None:
        if adapted.shape[0] != entities.shape[0]:
            raise ValueError(f"cosine_alignment_loss: unindexed pairs need as many rows in 'adapted' "
                             f"({adapted.shape[0]}) as in 'entities' ({entities.shape[0]})")
        a, t = adapted, entities
    else:
        for name, idx in (("region_index", region_index), ("entity_index", entity_index)):
            if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
                raise ValueError(f"cosine_alignment_loss: '{name}' must be an int64 tensor [P]")
        if region_index.shape != entity_index.shape:
            raise ValueError(f"cosine_alignment_loss: 'region_index' {tuple(region_index.shape)} and 'entity_index' "
                             f"{tuple(entity_index.shape)} must have the same length")
        a, t = adapted[region_index], entities[entity_index]
    if a.shape[0] == 0:
        return adapted.float().sum() * 0.0
    cos = (F.normalize(a.float(), dim=-1) * F.normalize(t.detach().float(), dim=-1)).sum(-1)
    return (1.0 - cos).mean()


def batch_loss(adapted: torch.Tensor, entity_embeddings: Sequence[torch.Tensor],
               matches: Sequence[Match]) -> tuple[torch.Tensor, int]:
    """The loss of a batch: adapted [N, Q, E], per-image entity embeddings [T_n, E] and matches -> (the mean of
    1 - cos over every confident pair of the batch, the number of pairs)."""
    if adapted.dim() != 3 or len(entity_embeddings) != adapted.shape[0] or len(matches) != adapted.shape[0]:
        raise ValueError(f"batch_loss: need adapted [N, Q, E] with N entity tensors and N matches, got "
                         f"{tuple(adapted.shape)}, {len(entity_embeddings)}, {len(matches)}")
    a, t = [], []
    for n, (emb, m) in enumerate(zip(entity_embeddings, matches)):
        if m.regions.numel():
            a.append(adapted[n][m.regions])
            t.append(emb[m.entities].to(adapted.device))
    if not a:
        return adapted.float().sum() * 0.0, 0
    a, t = torch.cat(a), torch.cat(t)
    return cosine_alignment_loss(a, t), int(a.shape[0])
