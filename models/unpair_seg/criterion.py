"""Stage-1 matching and losses of Unpair-Seg (spec §11.1, §8 training rows; thesis ch. 3 "Mask generation").

The official repository releases no training code, so everything here is built from the configuration keys (spec §8:
``Many2ManySetCriterion``, ``MASK_WEIGHT 2 / DICE_WEIGHT 1 / IOU_WEIGHT 1``, ``MATCHER_NUM_POINTS 6000``,
``TRAIN_NUM_POINTS 12544``, ``OVERSAMPLE_RATIO 3``, ``IMPORTANCE_SAMPLE_RATIO 0.75``, ``DEEP_SUPERVISION true``), the
thesis text and the Mask2Former conventions the code base inherits. Each choice the code does not fix is stated here.

Layouts
-------
Decoder outputs (models/unpair_seg/mask_decoder.py, ``UnpairSegS1.decode``)::

    {"pred_masks": [N, Q, K, h, w] mask logits (stride 4 of the canvas), "pred_ious": [N, Q, K] IoU scores in (0, 1)
     (one sigmoid applied, as official), "aux_outputs": [{"pred_masks", "pred_ious"}] * (dec_layers - 1)}

with K = num_masks (4) for point prompts and K = 1 for box prompts.

Targets (``train.data.sa1b.collate``, the batch padded to the largest image of the batch)::

    "masks":         bool/uint8 [N, T, H, W]  GT masks on the canvas (any resolution covering the same canvas as the
                                               predictions, e.g. the full canvas S x S)
    "mask_valid":    bool [N, T]               real masks (False = padding)
    "point_targets": bool [N, Q, T]            point prompts: membership, True where mask t contains point q
                                               (all False for padding prompts and padding masks)
    "box_targets":   long [N, Q]               box prompts: the index t of the mask whose box prompted, -1 = padding

Matching (point prompts, :class:`Many2ManyMatcher`)
---------------------------------------------------
A point lies inside several nested masks (object part, object, group of objects): its targets are all GT masks that
contain it. Its K outputs are assigned to those targets by a Hungarian assignment (``scipy.optimize.
linear_sum_assignment``) on the Mask2Former cost ``cost_mask * BCE + cost_dice * Dice`` evaluated on ``num_points``
(6000) uniformly random points, one set per image shared by all its prompts and masks (as Mask2Former). The cost
weights default to the loss weights (2 / 1), as Mask2Former's matcher takes ``MASK_WEIGHT`` / ``DICE_WEIGHT``.

* Fewer targets than outputs (T_q < K): each target gets one output; the K - T_q other outputs are **unmatched and get
  no loss at all** (neither mask nor IoU), as the thesis says ("we do not apply any penalty to the remaining unmatched
  predicted masks"). Targets are not repeated.
* More targets than outputs (T_q > K): the assignment picks the K targets the outputs fit best; the others get no
  output for this point (another point, or another image, covers them).
* A point with no target (outside every mask; the loader never emits such a point, but hand-made batches may) and a
  padding prompt contribute nothing.

``MATCHER_THRES_POS 0.7`` has no role we could pin down (spec §11.1, open question): it is not used.

Losses (:class:`Many2ManySetCriterion`)
---------------------------------------
For every matched (output, target) pair, on ``num_points`` (12544) points drawn per pair by Mask2Former's uncertainty
importance sampling (``oversample_ratio`` x ``num_points`` random candidates, the ``importance_sample_ratio`` fraction
with the highest uncertainty ``-|logit|`` of the prediction kept, the rest uniformly random; no gradient through the
choice):

* ``loss_mask``: sigmoid BCE, mean over the points, summed over pairs;
* ``loss_dice``: ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)`` with ``p = sigmoid(logit)``, summed over pairs;
* ``loss_iou``: ``(pred_iou - IoU)^2`` (SAM's MSE), summed over pairs, where IoU is the IoU between the binarised
  prediction (``logit > 0``) and its target, both on the prediction's stride-4 grid (the target area-averaged to that
  grid and kept where >= 0.5), with no gradient (the target is detached). An empty union gives IoU 0.

Each sum is divided by the number of matched pairs of the batch, summed over ranks and divided by the world size
(Mask2Former's ``num_masks``), at least 1. Deep supervision: the last head gives ``loss_mask`` / ``loss_dice`` /
``loss_iou``; aux head ``i`` (0 = the head before any decoder layer) gives ``loss_mask_i`` etc., each head matched
independently against its own predictions. Box prompts are trained on head 0 of the decoder (K = 1): the target of a
box is the mask whose box prompted (no matching), keys ``loss_box_mask``, ``loss_box_mask_i``, ...

Weights (:meth:`Many2ManySetCriterion.weight_of`): mask 2, dice 1, IoU 1 (the released config, the default, preset
``"config"``); the thesis states IoU 5 (preset ``"thesis"``). :meth:`Many2ManySetCriterion.total` is the weighted sum.
After each call, ``stats[prompt_type]`` holds the matched pairs of this rank and the mean IoU target of the last head
(training metrics).

Memory
------
At the official scale a batch has thousands of matched pairs (7 images x 100 points x 4 outputs per GPU) against
1024^2 masks, so no GT mask is gathered per pair at full resolution: GT values at the sampled points come from
:func:`sample_maps` (four gathers per point straight from the batch's mask tensor, equal to ``point_sample`` on the
gathered masks), and the IoU targets from the masks area-averaged once per call to the prediction grid. The pairs'
stride-4 logits are gathered per chunk (small) and point-sampled with ``grid_sample``. Pairs are processed in chunks
of about ``chunk_points`` sampled points, so peak memory is bounded; the random draws are made per chunk (for a
given chunk size the result is deterministic, and a single chunk gives exactly Mask2Former's draw order).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

PRESETS = {"config": {"mask_weight": 2.0, "dice_weight": 1.0, "iou_weight": 1.0},
           "thesis": {"mask_weight": 2.0, "dice_weight": 1.0, "iou_weight": 5.0}}


# ---------------------------------------------------------------------------------------------------------------------
# Point sampling


def point_sample(input: torch.Tensor, point_coords: torch.Tensor, **kwargs) -> torch.Tensor:
    """Bilinear values of ``input`` [N, C, H, W] at ``point_coords`` [N, P, 2] (or [N, Hp, Wp, 2]), normalised
    (x, y) in [0, 1] over the whole map (0 = the left/top edge, 1 = the right/bottom edge, as ``align_corners=False``)
    -> [N, C, P] (or [N, C, Hp, Wp]). Outside points read zeros (``grid_sample``'s default padding)."""
    if input.dim() != 4:
        raise ValueError(f"point_sample: 'input' must be [N, C, H, W], got shape {tuple(input.shape)}")
    if point_coords.dim() not in (3, 4) or point_coords.shape[-1] != 2 or point_coords.shape[0] != input.shape[0]:
        raise ValueError(f"point_sample: 'point_coords' must be [N, P, 2] or [N, Hp, Wp, 2] with N = "
                         f"{input.shape[0]}, got shape {tuple(point_coords.shape)}")
    flat = point_coords.dim() == 3
    grid = point_coords.unsqueeze(2) if flat else point_coords
    out = F.grid_sample(input, 2.0 * grid.to(input.dtype) - 1.0, align_corners=False, **kwargs)
    return out.squeeze(3) if flat else out


def sample_maps(maps: torch.Tensor, index: torch.Tensor, coords: torch.Tensor,
                chunk_points: int = 1 << 22) -> torch.Tensor:
    """``point_sample(maps[index][:, None].float(), coords)[:, 0]`` without gathering the maps: maps [R, H, W] (any
    dtype, e.g. bf16 logits or bool masks), index int64 [M] into R, coords [M, P, 2] (x, y) in [0, 1] -> fp32 [M, P].

    Bilinear with ``align_corners=False`` and zeros outside, as ``grid_sample``; four ``torch.take`` gathers per
    point, in chunks of about ``chunk_points`` points. Differentiable with respect to floating ``maps``."""
    if maps.dim() != 3:
        raise ValueError(f"sample_maps: 'maps' must be [R, H, W], got shape {tuple(maps.shape)}")
    if index.dim() != 1 or coords.dim() != 3 or coords.shape[0] != index.shape[0] or coords.shape[-1] != 2:
        raise ValueError(f"sample_maps: need index [M] and coords [M, P, 2], got {tuple(index.shape)} and "
                         f"{tuple(coords.shape)}")
    h, w = maps.shape[-2:]
    m, p = coords.shape[:2]
    if m == 0 or p == 0:
        return maps.new_zeros((m, p), dtype=torch.float32)
    step = max(1, chunk_points // p)
    out = []
    for s in range(0, m, step):
        c = coords[s:s + step].float()
        base = (index[s:s + step].to(coords.device).long() * (h * w))[:, None]
        x = c[..., 0] * w - 0.5
        y = c[..., 1] * h - 0.5
        x0, y0 = torch.floor(x), torch.floor(y)
        fx, fy = x - x0, y - y0
        x0, y0 = x0.long(), y0.long()
        acc = torch.zeros_like(x)
        for dy, wy in ((0, 1 - fy), (1, fy)):
            yy = y0 + dy
            oky = (yy >= 0) & (yy < h)
            for dx, wx in ((0, 1 - fx), (1, fx)):
                xx = x0 + dx
                ok = oky & (xx >= 0) & (xx < w)
                lin = base + yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)
                acc = acc + torch.take(maps, lin).float() * (wx * wy * ok)
        out.append(acc)
    return torch.cat(out) if len(out) > 1 else out[0]


def calculate_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Uncertainty of mask logits (any shape): ``-|logit|`` (highest at the decision boundary)."""
    return -torch.abs(logits)


def _check_sampling(who: str, num_points, oversample_ratio, importance_sample_ratio) -> None:
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"{who}: 'num_points' must be a positive int, got {num_points!r}")
    if not oversample_ratio >= 1:
        raise ValueError(f"{who}: 'oversample_ratio' must be >= 1, got {oversample_ratio!r}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"{who}: 'importance_sample_ratio' must be in [0, 1], got {importance_sample_ratio!r}")


def _importance_coords(rows: int, values: Callable[[torch.Tensor], torch.Tensor],
                       uncertainty_func: Callable[[torch.Tensor], torch.Tensor], num_points: int,
                       oversample_ratio: float, importance_sample_ratio: float, device,
                       generator: Optional[torch.Generator]) -> torch.Tensor:
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(rows, num_sampled, 2, device=device, generator=generator)
    unc = uncertainty_func(values(coords))
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(unc, k=num_uncertain, dim=1).indices
    picked = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        picked = torch.cat([picked, torch.rand(rows, num_random, 2, device=device, generator=generator)], dim=1)
    return picked


def uncertainty_point_coords(coarse_logits: torch.Tensor, uncertainty_func: Callable[[torch.Tensor], torch.Tensor],
                             num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mask2Former's importance sampling (PointRend): [R, 1, h, w] logits -> [R, num_points, 2] coords in [0, 1].

    ``int(num_points * oversample_ratio)`` uniform candidates per row; the ``int(importance_sample_ratio *
    num_points)`` most uncertain of them (``uncertainty_func`` of the bilinear logits) are kept, then
    ``num_points - that`` fresh uniform points follow."""
    _check_sampling("uncertainty_point_coords", num_points, oversample_ratio, importance_sample_ratio)
    if coarse_logits.dim() != 4 or coarse_logits.shape[1] != 1:
        raise ValueError(f"uncertainty_point_coords: 'coarse_logits' must be [R, 1, h, w], got shape "
                         f"{tuple(coarse_logits.shape)}")
    return _importance_coords(coarse_logits.shape[0], lambda c: point_sample(coarse_logits.float(), c)[:, 0],
                              uncertainty_func, num_points, oversample_ratio, importance_sample_ratio,
                              coarse_logits.device, generator)


# ---------------------------------------------------------------------------------------------------------------------
# Losses and pairwise costs on sampled points


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE of logits [M, P] against targets [M, P] in [0, 1]: mean over P, summed over M, / ``num_masks``."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float | torch.Tensor) -> torch.Tensor:
    """Dice of logits [M, P] against targets [M, P]: ``1 - (2 sum(p t) + 1) / (sum p + sum t + 1)``, summed over M,
    / ``num_masks``."""
    p = inputs.sigmoid()
    num = 2 * (p * targets).sum(-1)
    den = p.sum(-1) + targets.sum(-1)
    return (1 - (num + 1) / (den + 1)).sum() / num_masks


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise mean BCE: logits [A, P] x targets [B, P] -> [A, B], entry (a, b) = mean_p BCE(inputs[a],
    targets[b])."""
    p = inputs.shape[1]
    pos = F.softplus(-inputs)  # BCE against 1
    neg = pos + inputs  # BCE against 0: softplus(x) = softplus(-x) + x
    return (pos @ targets.T + neg @ (1 - targets).T) / p


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise Dice loss: logits [A, P] x targets [B, P] -> [A, B]."""
    p = inputs.sigmoid()
    num = 2 * p @ targets.T
    den = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def downsample_masks(masks: torch.Tensor, size: tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """bool masks [R, H, W] -> bool [R, h, w]: the area average over each target cell (exact cell coverage when H, W
    are multiples of h, w), kept where >= 0.5; in chunks of ``chunk`` masks (no full-size float copy)."""
    h, w = int(size[0]), int(size[1])
    if masks.shape[-2:] == (h, w):
        return masks.bool()
    out = torch.zeros(masks.shape[0], h, w, dtype=torch.bool, device=masks.device)
    for s in range(0, masks.shape[0], chunk):
        part = masks[s:s + chunk, None].float()
        out[s:s + chunk] = F.interpolate(part, size=(h, w), mode="area")[:, 0] >= 0.5
    return out


def binarised_iou(pred_logits: torch.Tensor, target_masks: torch.Tensor) -> torch.Tensor:
    """IoU target of the IoU head: logits [M, h, w] and GT masks [M, H, W] covering the same canvas -> [M] (no grad).

    The prediction is binarised at logit > 0; the target is :func:`downsample_masks` to (h, w). An empty union
    gives 0."""
    with torch.no_grad():
        tgt = downsample_masks(target_masks, pred_logits.shape[-2:])
        pred = pred_logits > 0
        inter = (pred & tgt).flatten(1).sum(1).float()
        union = (pred | tgt).flatten(1).sum(1).float()
        return inter / union.clamp(min=1.0)


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mask2Former's num_masks: sum over ranks / world size (a no-op without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


def _check_masks(pred_masks: torch.Tensor, masks: torch.Tensor, who: str) -> None:
    if pred_masks.dim() != 5:
        raise ValueError(f"{who}: 'pred_masks' must be [N, Q, K, h, w], got shape {tuple(pred_masks.shape)}")
    if masks.dim() != 4 or masks.shape[0] != pred_masks.shape[0]:
        raise ValueError(f"{who}: targets['masks'] must be [N, T, H, W] with N = {pred_masks.shape[0]}, got shape "
                         f"{tuple(masks.shape)}")
    h, w = pred_masks.shape[-2:]
    H, W = masks.shape[-2:]
    if H * w != W * h:
        raise ValueError(f"{who}: predictions ({h} x {w}) and targets['masks'] ({H} x {W}) must cover the same canvas "
                         "(same aspect ratio)")


# ---------------------------------------------------------------------------------------------------------------------
# Matching


class Many2ManyMatcher(nn.Module):
    """Hungarian assignment of each point prompt's K outputs to the GT masks containing the point (module docstring).

    Args:
        cost_mask, cost_dice: weights of the BCE and Dice costs (default: the loss weights 2 / 1).
        num_points: random points per image on which the costs are evaluated (``MATCHER_NUM_POINTS`` 6000).
        generator: an optional ``torch.Generator`` for the points (default: the global RNG of the device).
    """

    def __init__(self, cost_mask: float = 2.0, cost_dice: float = 1.0, num_points: int = 6000,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        for name, v in (("cost_mask", cost_mask), ("cost_dice", cost_dice)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"Many2ManyMatcher: '{name}' must be a number >= 0, got {v!r}")
        if cost_mask + cost_dice <= 0:
            raise ValueError("Many2ManyMatcher: 'cost_mask' and 'cost_dice' must not both be 0")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"Many2ManyMatcher: 'num_points' must be a positive int, got {num_points!r}")
        self.cost_mask, self.cost_dice, self.num_points = float(cost_mask), float(cost_dice), num_points
        self.generator = generator

    def cost(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``cost_mask * BCE + cost_dice * Dice`` of point logits [A, P] against point labels [B, P] -> [A, B]."""
        return self.cost_mask * batch_sigmoid_ce_cost(logits, labels) + self.cost_dice * batch_dice_cost(logits, labels)

    @torch.no_grad()
    def forward(self, pred_masks: torch.Tensor, masks: torch.Tensor,
                point_targets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``pred_masks`` [N, Q, K, h, w] logits, ``masks`` [N, T, H, W], ``point_targets`` bool [N, Q, T] ->
        per image (prompt index, output index, target index), three int64 tensors of the matched pairs on the CPU,
        ordered by prompt then output."""
        _check_masks(pred_masks, masks, "Many2ManyMatcher")
        n, q, k = pred_masks.shape[:3]
        t = masks.shape[1]
        if tuple(point_targets.shape) != (n, q, t):
            raise ValueError(f"Many2ManyMatcher: 'point_targets' must be [N, Q, T] = {(n, q, t)}, got "
                             f"{tuple(point_targets.shape)}")
        member = point_targets.bool()
        mask_maps = masks.reshape(n * t, *masks.shape[-2:])
        out = []
        empty = torch.zeros(0, dtype=torch.long)
        for b in range(n):
            qs = torch.nonzero(member[b].any(-1)).flatten()
            if qs.numel() == 0:
                out.append((empty, empty, empty))
                continue
            ts = torch.nonzero(member[b, qs].any(0)).flatten()  # only the masks some prompt needs
            coords = torch.rand(self.num_points, 2, device=pred_masks.device, generator=self.generator)
            logits = point_sample(pred_masks[b, qs].reshape(1, len(qs) * k, *pred_masks.shape[-2:]).float(),
                                  coords[None])[0]
            labels = sample_maps(mask_maps, b * t + ts, coords[None].expand(len(ts), -1, -1))
            cost = self.cost(logits, labels).reshape(len(qs), k, len(ts)).cpu().numpy()
            sub = member[b, qs][:, ts].cpu().numpy()
            ts_np, qs_np = ts.cpu().numpy(), qs.cpu().numpy()
            qi, ki, ti = [], [], []
            for j in range(len(qs_np)):
                cols = np.flatnonzero(sub[j])
                rows, picked = linear_sum_assignment(cost[j][:, cols])
                order = np.argsort(rows, kind="stable")
                qi.append(np.full(len(rows), qs_np[j]))
                ki.append(rows[order])
                ti.append(ts_np[cols[picked[order]]])
            out.append(tuple(torch.as_tensor(np.concatenate(v), dtype=torch.long) for v in (qi, ki, ti)))
        return out


def matched_count(point_targets: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """Pairs a Hungarian assignment makes: sum over prompts of min(K, number of targets) (float scalar)."""
    return point_targets.bool().sum(-1).clamp(max=num_outputs).sum().float()


# ---------------------------------------------------------------------------------------------------------------------
# Criterion


class Many2ManySetCriterion(nn.Module):
    """Stage-1 losses for point prompts (many-to-many matching) and box prompts (module docstring).

    Args:
        num_masks: outputs per point prompt (K, ``NUM_MASKS`` 4).
        matcher: a :class:`Many2ManyMatcher` (default: cost weights = the mask / dice weights, 6000 points).
        mask_weight, dice_weight, iou_weight: loss weights (default 2 / 1 / 1, the config; :meth:`from_preset`
            ``"thesis"`` is 2 / 1 / 5).
        num_points, oversample_ratio, importance_sample_ratio: the point-sampled losses (12544 / 3 / 0.75).
        deep_supervision: also supervise every aux head (``DEEP_SUPERVISION`` true).
        generator: optional ``torch.Generator`` for the loss points.
        chunk_points: sampled points per chunk of pairs (memory bound; module docstring).
    """

    def __init__(self, num_masks: int = 4, matcher: Optional[Many2ManyMatcher] = None, mask_weight: float = 2.0,
                 dice_weight: float = 1.0, iou_weight: float = 1.0, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75, deep_supervision: bool = True,
                 generator: Optional[torch.Generator] = None, chunk_points: int = 1 << 24):
        super().__init__()
        if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
            raise ValueError(f"Many2ManySetCriterion: 'num_masks' must be a positive int, got {num_masks!r}")
        for name, v in (("mask_weight", mask_weight), ("dice_weight", dice_weight), ("iou_weight", iou_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"Many2ManySetCriterion: '{name}' must be a number >= 0, got {v!r}")
        _check_sampling("Many2ManySetCriterion", num_points, oversample_ratio, importance_sample_ratio)
        if isinstance(chunk_points, bool) or not isinstance(chunk_points, int) or chunk_points < 1:
            raise ValueError(f"Many2ManySetCriterion: 'chunk_points' must be a positive int, got {chunk_points!r}")
        if matcher is not None and not isinstance(matcher, Many2ManyMatcher):
            raise TypeError(f"Many2ManySetCriterion: 'matcher' must be a Many2ManyMatcher, got "
                            f"{type(matcher).__name__}")
        self.num_masks = num_masks
        self.matcher = matcher if matcher is not None else Many2ManyMatcher(mask_weight, dice_weight)
        self.weights = {"mask": float(mask_weight), "dice": float(dice_weight), "iou": float(iou_weight)}
        self.num_points, self.oversample_ratio = num_points, float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.deep_supervision = bool(deep_supervision)
        self.generator = generator
        self.chunk_points = chunk_points
        self.stats: dict[str, dict[str, float]] = {}

    @classmethod
    def from_preset(cls, preset: str = "config", **kwargs) -> "Many2ManySetCriterion":
        """``"config"`` (mask 2, dice 1, IoU 1: the released S1 config) or ``"thesis"`` (2 / 1 / 5); ``kwargs``
        override the weights and set the other arguments; ``matcher_num_points`` (default 6000) sizes the default
        matcher, whose cost weights are the mask / dice weights."""
        if preset not in PRESETS:
            raise ValueError(f"Many2ManySetCriterion.from_preset: 'preset' must be one of {sorted(PRESETS)}, got "
                             f"{preset!r}")
        kw = dict(PRESETS[preset])
        kw.update(kwargs)
        mp = kw.pop("matcher_num_points", 6000)
        if "matcher" not in kw:
            kw["matcher"] = Many2ManyMatcher(kw["mask_weight"], kw["dice_weight"], mp)
        return cls(**kw)

    # -- names and weights --------------------------------------------------------------------------------------------

    @staticmethod
    def key(term: str, prompt_type: str = "point", head: Optional[int] = None) -> str:
        """The loss name: ``loss_[box_]<term>[_<aux head>]``."""
        prefix = "box_" if prompt_type == "box" else ""
        return f"loss_{prefix}{term}" + ("" if head is None else f"_{head}")

    def heads(self, outputs: dict) -> list[tuple[Optional[int], dict]]:
        """[(None, last head), (0, aux 0), ...] (aux heads only with deep supervision)."""
        out = [(None, outputs)]
        if self.deep_supervision:
            out += [(i, a) for i, a in enumerate(outputs.get("aux_outputs") or [])]
        return out

    def weight_of(self, name: str) -> float:
        """The weight of a loss name (``loss_[box_]<term>[_i]`` -> the weight of ``<term>``)."""
        parts = name.split("_")
        term = parts[2] if len(parts) > 2 and parts[1] == "box" else (parts[1] if len(parts) > 1 else "")
        if parts[0] != "loss" or term not in self.weights:
            raise ValueError(f"Many2ManySetCriterion.weight_of: {name!r} is not a loss name of this criterion")
        return self.weights[term]

    def total(self, losses: dict) -> torch.Tensor:
        """The weighted sum of a loss dict of this criterion."""
        return sum(self.weight_of(k) * v for k, v in losses.items())

    # -- losses -------------------------------------------------------------------------------------------------------

    def pair_losses(self, pred_maps: torch.Tensor, src: torch.Tensor, src_ious: torch.Tensor, mask_maps: torch.Tensor,
                    low_masks: torch.Tensor, tgt: torch.Tensor, num: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Unweighted {mask, dice, iou} of M matched pairs, divided by ``num``, and the IoU targets [M].

        ``pred_maps`` [R, h, w] logits (a view of the head's pred_masks), ``src`` [M] indices into R, ``src_ious``
        [M] the pairs' IoU scores, ``mask_maps`` [R', H, W] GT masks, ``low_masks`` [R', h, w] the same on the
        prediction grid (:func:`downsample_masks`), ``tgt`` [M] indices into R'. With M = 0 the losses are zeros
        that keep the graph (every rank runs the same backward)."""
        m = src.shape[0]
        if m == 0:
            zero = pred_maps.sum() * 0.0 + src_ious.sum() * 0.0
            return {"mask": zero, "dice": zero, "iou": zero}, src_ious.new_zeros(0, dtype=torch.float32)
        step = max(1, self.chunk_points // max(1, int(self.num_points * self.oversample_ratio)))
        mask_l = dice_l = 0.0
        ious = []
        for s in range(0, m, step):
            sc, tc = src[s:s + step], tgt[s:s + step]
            # The chunk's logits at the prediction resolution are small (stride 4): gather them and use grid_sample;
            # the full-resolution GT is only ever read at the points (sample_maps).
            logit_maps = pred_maps[sc].float()
            with torch.no_grad():
                coords = uncertainty_point_coords(logit_maps.detach()[:, None], calculate_uncertainty,
                                                  self.num_points, self.oversample_ratio,
                                                  self.importance_sample_ratio, self.generator)
                labels = sample_maps(mask_maps, tc, coords)
                pred_bin = logit_maps.detach() > 0
                low = low_masks[tc]
                inter = (pred_bin & low).flatten(1).sum(1).float()
                union = (pred_bin | low).flatten(1).sum(1).float()
                ious.append(inter / union.clamp(min=1.0))
            logits = point_sample(logit_maps[:, None], coords)[:, 0]
            mask_l = mask_l + sigmoid_ce_loss(logits, labels, num)
            dice_l = dice_l + dice_loss(logits, labels, num)
        iou_target = torch.cat(ious)
        iou_l = F.mse_loss(src_ious.float(), iou_target, reduction="sum") / num
        return {"mask": mask_l, "dice": dice_l, "iou": iou_l}, iou_target

    def forward(self, outputs: dict, targets: dict, prompt_type: str = "point") -> dict[str, torch.Tensor]:
        """Unweighted losses of every supervised head (names :meth:`key`); ``outputs`` is the decoder dict of
        ``prompt_type`` ("point": K = num_masks outputs, many-to-many matching on ``targets["point_targets"]``;
        "box": K = 1, the target of ``targets["box_targets"]``). Layouts in the module docstring."""
        if prompt_type not in ("point", "box"):
            raise ValueError(f"Many2ManySetCriterion: 'prompt_type' must be 'point' or 'box', got {prompt_type!r}")
        if not isinstance(outputs, dict) or not isinstance(targets, dict):
            raise TypeError("Many2ManySetCriterion: 'outputs' and 'targets' must be dicts (module docstring)")
        for k in ("pred_masks", "pred_ious"):
            if k not in outputs:
                raise ValueError(f"Many2ManySetCriterion: 'outputs' must hold {k!r} (the decoder dict)")
        if "masks" not in targets:
            raise ValueError("Many2ManySetCriterion: 'targets' must hold 'masks' [N, T, H, W]")
        masks = targets["masks"]
        pred = outputs["pred_masks"]
        _check_masks(pred, masks, "Many2ManySetCriterion")
        n, q, k = pred.shape[:3]
        t = masks.shape[1]
        if tuple(outputs["pred_ious"].shape) != (n, q, k):
            raise ValueError(f"Many2ManySetCriterion: 'pred_ious' must be [N, Q, K] = {(n, q, k)}, got "
                             f"{tuple(outputs['pred_ious'].shape)}")
        dev = pred.device
        mask_maps = masks.reshape(n * t, *masks.shape[-2:])
        low_masks = downsample_masks(mask_maps, pred.shape[-2:])
        valid = targets.get("mask_valid")
        losses = {}
        if prompt_type == "point":
            if k != self.num_masks:
                raise ValueError(f"Many2ManySetCriterion: point prompts need K = num_masks = {self.num_masks} "
                                 f"outputs, got {k}")
            member = targets.get("point_targets")
            if member is None or tuple(member.shape) != (n, q, t):
                got = None if member is None else tuple(member.shape)
                raise ValueError(f"Many2ManySetCriterion: targets['point_targets'] must be bool [N, Q, T] = "
                                 f"{(n, q, t)}, got {got}")
            member = member.bool()
            if valid is not None:
                member = member & valid.bool()[:, None, :]
            num = _all_reduce_mean(matched_count(member, k).to(dev)).clamp(min=1.0)
            for head, out in self.heads(outputs):
                idx = self.matcher(out["pred_masks"], masks, member)
                b = torch.cat([torch.full_like(i[0], j) for j, i in enumerate(idx)]).to(dev)
                qi, ki, ti = (torch.cat([i[c] for i in idx]).to(dev) for c in range(3))
                pm = out["pred_masks"]
                parts, iou_t = self.pair_losses(pm.reshape(n * q * k, *pm.shape[-2:]), (b * q + qi) * k + ki,
                                                out["pred_ious"][b, qi, ki], mask_maps, low_masks, b * t + ti, num)
                losses.update({self.key(term, prompt_type, head): v for term, v in parts.items()})
                if head is None:
                    self._record(prompt_type, iou_t)
        else:
            if k != 1:
                raise ValueError(f"Many2ManySetCriterion: box prompts have K = 1 output (head 0), got {k}")
            bt = targets.get("box_targets")
            if bt is None or tuple(bt.shape) != (n, q):
                got = None if bt is None else tuple(bt.shape)
                raise ValueError(f"Many2ManySetCriterion: targets['box_targets'] must be long [N, Q] = {(n, q)}, got "
                                 f"{got}")
            bt = bt.long().to(dev)
            if bool((bt >= t).any()):
                raise ValueError(f"Many2ManySetCriterion: targets['box_targets'] indexes beyond T = {t}")
            b, qi = torch.nonzero(bt >= 0, as_tuple=True)
            ti = bt[b, qi]
            if valid is not None and not bool(valid.bool().to(dev)[b, ti].all()):
                raise ValueError("Many2ManySetCriterion: targets['box_targets'] points at padding masks")
            num = _all_reduce_mean(torch.tensor(float(b.numel()), device=dev)).clamp(min=1.0)
            for head, out in self.heads(outputs):
                pm = out["pred_masks"]
                parts, iou_t = self.pair_losses(pm.reshape(n * q, *pm.shape[-2:]), b * q + qi,
                                                out["pred_ious"][b, qi, 0], mask_maps, low_masks, b * t + ti, num)
                losses.update({self.key(term, prompt_type, head): v for term, v in parts.items()})
                if head is None:
                    self._record(prompt_type, iou_t)
        return losses

    def _record(self, prompt_type: str, iou: torch.Tensor) -> None:
        self.stats[prompt_type] = {"pairs": float(iou.numel()), "iou": float(iou.mean()) if iou.numel() else 0.0}


__all__: Sequence[str] = ("point_sample", "sample_maps", "calculate_uncertainty", "uncertainty_point_coords",
                          "sigmoid_ce_loss", "dice_loss", "batch_sigmoid_ce_cost", "batch_dice_cost",
                          "downsample_masks", "binarised_iou", "matched_count", "Many2ManyMatcher",
                          "Many2ManySetCriterion", "PRESETS")
