"""Unpair-Seg stage 1: the official meta-architecture ``UniOVSeg_S1`` (../shared/specs/unpair_seg.md §0, §7) on our
modules.

Module tree = the official state-dict paths (spec §9): ``backbone`` (:class:`CLIPBackbone`, keys
``backbone.clip_model.*``), ``sem_seg_head.pixel_decoder`` (:class:`MSDeformAttnPixelDecoder`) and
``sem_seg_head.predictor`` (:class:`MultiScaleMaskDecoder`); ``pixel_mean`` / ``pixel_std`` are non-persistent
buffers [3, 1, 1] (officially too), so no key is renamed anywhere.

Layouts (N images, Q prompts per image, K outputs per prompt: ``num_masks`` for points, 1 for boxes, S =
``cfg.image_size`` the square canvas, content top-left; prompts in canvas pixels)::

    preprocess_images  images [N, 3, H, W] 0..255 (uint8 or float) -> normalised fp32, zero-padded bottom/right to
                       a multiple of size_divisibility (the official ImageList)
    image_features     images -> (mask_features [N, C, H/4, W/4], [s32, s16, s8] maps [N, C, h, w])
    decode             prompts [N, Q, 2] points (x, y) | [N, Q, 4] boxes xyxy -> the decoder dict
                       {"pred_masks": [N, Q, K, H/4, W/4] logits, "pred_ious": [N, Q, K] (one sigmoid),
                        "aux_outputs": [...]}; a point becomes the box (x-2, y-2, x+2, y+2) here (spec §7.2, §12.7)
    forward(images=, prompts=, prompt_type=)   training / raw: decode(*image_features(images), ...)
    forward(images=, prompts={"point": P, "box": B})   one image_features pass, {type: decoder dict}
    forward(batched_inputs)                    official inference (below) -> one dict per image
    predict(image_uint8_hwc, points=|boxes=|grid=)   one original image, prompts in ORIGINAL pixels

Official inference (``forward(batched_inputs)``; spec §7.3): batched_inputs is a list of dicts ``{"image": uint8
[3, S, S] canvas, "height": H, "width": W (original size; default S), optional "points" [P, 2] or "boxes" [P, 4]
canvas px}``; without prompts the ``cfg.pts_per_side`` grid of the original extent (preprocess.point_grid). The
image features are computed once for the whole batch; each image's prompts go through the decoder in chunks of
``cfg.points_per_batch``. Post-processing per image: IoU score = sigmoid(pred_iou) (a second sigmoid, spec §12.1),
keep score >= ``score_threshold``, masks bilinearly upsampled to S x S, ``mmkernels.mask_nms`` (IoU ``nms_iou`` OR
coverage ``nms_coverage``, masks downsampled by ``nms_downsample``), kept logits bilinearly resized to
(max(H, W), max(H, W)) and cropped to [:H, :W]. Returns per image::

    {"proposal": [K', H, W] mask logits, "scores": [K'] double-sigmoid IoU, descending (NMS order),
     "points" [K', 2] | "boxes" [K', 4]: the canvas prompt each proposal came from,
     "prompt_index": int64 [K'] into the image's prompts, "mask_index": int64 [K'] which of the K outputs}

Decisions where the official code is silent or differs (all give the official proposals):

* The score filter runs BEFORE the upsampling, chunk by chunk, and only kept masks are upsampled: the filter reads
  only the scores and bilinear upsampling is per mask, so the kept set and logits are the official ones, and the
  memory is the kept masks' instead of all P*K masks at S x S (spec §12.15: ~6.7 GB officially). The NMS input is
  held only at its downsampled size (``finish``). Deep-supervision
  outputs are not kept at inference. Results do not depend on ``points_per_batch`` (prompts never interact).
* Ties in the NMS: mmkernels.mask_nms visits tied scores lowest index first (prompt-major, then output); the
  official ``torch.sort`` promises no order among ties (on CUDA it is stable, lowest index first, beyond 32
  elements, and a bitonic sort below). Ties are common under bf16 autocast (about 21 bf16 values lie above 0.648).
* Under bf16 autocast the official NMS computes its intersection matrix with a bf16 einsum (autocast reaches it),
  rounding the pixel counts (e.g. 1001 -> 1000); mmkernels.mask_nms counts exactly on every backend. The kept sets
  differ only where a pair's IoU or coverage lies within that rounding (~0.4%) of its threshold; in fp32 they are
  identical.
* Box prompts work (the official box path reads detectron2 ``Boxes`` and crashes in ``get_center``, spec §12.13):
  plain xyxy tensors, token/head 0, no +0.5 shift. Images may mix prompt types across the batch.
* The batch may hold N >= 1 images (the official prompt loop assumes N = 1); an image without any prompt (P = 0)
  gives empty results; an empty NMS input (nothing above the threshold) gives K' = 0 (the official code fails).
* The inference path runs without gradients and regardless of train/eval mode (no module here has dropout or
  batch statistics at inference: the backbone is always in eval mode and every dropout is 0).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.unpair_seg import preprocess as pp
from models.unpair_seg.backbone import CLIPBackbone
from models.unpair_seg.config import UnpairSegConfig
from models.unpair_seg.mask_decoder import MultiScaleMaskDecoder
from models.unpair_seg.pixel_decoder import MSDeformAttnPixelDecoder

IN_FEATURES = ("res2", "res3", "res4", "res5")
PROMPT_TYPES = ("point", "box")
BOX_PADDING = 2.0  # a point (x, y) is the box (x - 2, y - 2, x + 2, y + 2) (spec §7.2)
UPSAMPLE_CHUNK = 64  # kept masks upsampled to the canvas at a time (64 x 1024² fp32 = 256 MB transient)


class SemSegHead(nn.Module):
    """The official ``sem_seg_head`` (a ModuleDict officially; the same keys): ``pixel_decoder`` and ``predictor``."""

    def __init__(self, cfg: UnpairSegConfig, input_shape: dict[str, tuple[int, int]]):
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(cfg, input_shape)
        self.predictor = MultiScaleMaskDecoder(cfg)

    def forward(self, features: dict, boxes: torch.Tensor, prompt_type: str) -> dict:
        """features: backbone outputs; boxes [N, Q, 4] xyxy canvas px (points already +-2 px boxes) -> the decoder
        dict of MultiScaleMaskDecoder."""
        mask_features, _, multi_scale = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale, mask_features, boxes, prompt_type)


def _check_prompt_type(prompt_type) -> str:
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"'prompt_type' must be 'point' or 'box', got {prompt_type!r}")
    return prompt_type


def _as_float_tensor(name: str, x, last: int) -> torch.Tensor:
    """A finite real tensor [..., last] as fp32 (numpy arrays and nested lists are converted)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    elif isinstance(x, (list, tuple)):
        x = torch.tensor(x, dtype=torch.float32)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"'{name}' must be a tensor [..., {last}], got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"'{name}' must be real-valued, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != last:
        raise ValueError(f"'{name}' must have last dim {last}, got shape {tuple(x.shape)}")
    x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"'{name}' must be finite")
    return x


class UnpairSegS1(nn.Module):
    """Unpair-Seg stage 1 (class-agnostic promptable mask generation); see the module docstring.

    Attributes: ``cfg`` (:class:`UnpairSegConfig`), ``backbone`` (:class:`CLIPBackbone`, frozen), ``sem_seg_head``
    (:class:`SemSegHead`), non-persistent buffers ``pixel_mean`` / ``pixel_std`` [3, 1, 1].
    """

    def __init__(self, cfg: UnpairSegConfig):
        super().__init__()
        if not isinstance(cfg, UnpairSegConfig):
            raise TypeError(f"UnpairSegS1: cfg must be an UnpairSegConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.backbone = CLIPBackbone(cfg)
        input_shape = {k: (self.backbone.channels[k], self.backbone.strides[k]) for k in IN_FEATURES}
        self.sem_seg_head = SemSegHead(cfg, input_shape)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # -- image path ---------------------------------------------------------------------------------------------------

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, 3, H, W] RGB 0..255 (uint8 or float) -> (x - mean) / std computed in fp32, zero-padded
        bottom/right to multiples of ``cfg.size_divisibility``, in the buffers' dtype (fp32 unless the model was
        cast), on the model's device."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"'images' must be a tensor [N, 3, H, W] (RGB 0..255), got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            raise ValueError(f"'images' must have shape [N, 3, H, W] with N >= 1, got {tuple(images.shape)}")
        if not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise TypeError(f"'images' must be uint8 or floating (RGB 0..255), got dtype {images.dtype}")
        if images.shape[2] < 1 or images.shape[3] < 1:
            raise ValueError(f"'images' must not be empty, got shape {tuple(images.shape)}")
        mean, std = self.pixel_mean.float(), self.pixel_std.float()
        x = (images.to(self.device, torch.float32) - mean) / std
        d = self.cfg.size_divisibility
        h, w = x.shape[-2:]
        ph, pw = (-h) % d, (-w) % d
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
        return x.to(self.pixel_mean.dtype).contiguous()

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """images [N, 3, H, W] 0..255 -> (mask_features [N, C, H'/4, W'/4], [s32, s16, s8] maps [N, C, h, w]), H', W'
        the padded size. The backbone is frozen (no_grad); the pixel decoder runs in grad mode as called."""
        features = self.backbone(self.preprocess_images(images))
        mask_features, _, multi_scale = self.sem_seg_head.pixel_decoder.forward_features(features)
        return mask_features, list(multi_scale)

    # -- prompts ------------------------------------------------------------------------------------------------------

    def prompt_boxes(self, prompts: torch.Tensor, prompt_type: str) -> torch.Tensor:
        """prompts [N, Q, 2] points or [N, Q, 4] boxes (canvas px) -> fp32 boxes [N, Q, 4] xyxy (points +-2 px)."""
        _check_prompt_type(prompt_type)
        if not isinstance(prompts, torch.Tensor):
            raise TypeError(f"'prompts' must be a tensor [N, Q, 2] (points) or [N, Q, 4] (boxes), got "
                            f"{type(prompts).__name__}")
        last = 2 if prompt_type == "point" else 4
        if prompts.dim() != 3 or prompts.shape[-1] != last:
            what = "points [N, Q, 2] (x, y)" if last == 2 else "boxes [N, Q, 4] (x0, y0, x1, y1)"
            raise ValueError(f"'prompts' for prompt_type={prompt_type!r} must be {what} in canvas pixels, got shape "
                             f"{tuple(prompts.shape)}")
        if prompts.dtype == torch.bool or prompts.is_complex():
            raise TypeError(f"'prompts' must be real-valued, got dtype {prompts.dtype}")
        p = prompts.to(torch.float32)  # never quantise canvas coordinates to bf16
        if prompt_type == "point":
            p = torch.cat([p - BOX_PADDING, p + BOX_PADDING], dim=-1)
        return p

    def decode(self, mask_features: torch.Tensor, multi_scale: Sequence[torch.Tensor], prompts: torch.Tensor,
               prompt_type: str, *, aux_outputs: bool = True) -> dict:
        """Decode prompts on precomputed image features (``image_features``).

        Args:
            mask_features: [N, C, H4, W4]; multi_scale: [s32, s16, s8] maps [N, C, h, w].
            prompts: points [N, Q, 2] (x, y) for "point" (made into +-2 px boxes here), boxes [N, Q, 4] xyxy for
                "box"; canvas pixels.
            prompt_type: "point" or "box".
            aux_outputs: keyword-only; False drops the deep-supervision outputs (inference).

        Returns:
            {"pred_masks": [N, Q, K, H4, W4] logits, "pred_ious": [N, Q, K] (one sigmoid), "aux_outputs": [...]}.
        """
        boxes = self.prompt_boxes(prompts, prompt_type)
        if isinstance(mask_features, torch.Tensor) and mask_features.dim() == 4 \
                and boxes.shape[0] != mask_features.shape[0]:
            raise ValueError(f"'prompts' must have one row per image: N = {mask_features.shape[0]} from "
                             f"mask_features, got {boxes.shape[0]}")
        device = mask_features.device if isinstance(mask_features, torch.Tensor) else self.device
        return self.sem_seg_head.predictor(list(multi_scale), mask_features, boxes.to(device), prompt_type,
                                           aux_outputs=aux_outputs)

    # -- the official inference path ----------------------------------------------------------------------------------

    def check_batched_inputs(self, batched_inputs) -> list[dict]:
        """Validated copies of the official ``batched_inputs`` entries (module docstring): "image" uint8 / float
        [3, S, S], "height" / "width" (default S), at most one of "points" [P, 2] / "boxes" [P, 4] (fp32)."""
        if isinstance(batched_inputs, dict) or not isinstance(batched_inputs, (list, tuple)) or not batched_inputs:
            raise TypeError("'batched_inputs' must be a non-empty list of dicts {'image': uint8 [3, S, S], "
                            "'height': H, 'width': W, optional 'points' [P, 2] / 'boxes' [P, 4]}")
        size = self.cfg.image_size
        out = []
        for i, e in enumerate(batched_inputs):
            if not isinstance(e, dict) or "image" not in e:
                raise TypeError(f"batched_inputs[{i}] must be a dict with an 'image' entry, got {type(e).__name__}")
            img = e["image"]
            if not isinstance(img, torch.Tensor) or not (img.dtype == torch.uint8 or img.is_floating_point()):
                raise TypeError(f"batched_inputs[{i}]['image'] must be a uint8 (or float 0..255) tensor [3, {size}, "
                                f"{size}]")
            if tuple(img.shape) != (3, size, size):
                raise ValueError(f"batched_inputs[{i}]['image'] must be the canvas [3, {size}, {size}] (resize the "
                                 f"longest side to {size} and pad: preprocess.prepare), got {tuple(img.shape)}")
            entry = {"image": img}
            for key in ("height", "width"):
                v = e.get(key, size)
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    v = v.item()
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                    raise ValueError(f"batched_inputs[{i}]['{key}'] must be a positive int, got {v!r}")
                entry[key] = int(v)
            if "points" in e and "boxes" in e:
                raise ValueError(f"batched_inputs[{i}] has both 'points' and 'boxes'; give one prompt type per image")
            if "points" in e:
                entry["points"] = _as_float_tensor(f"batched_inputs[{i}]['points']", e["points"], 2)
                if entry["points"].dim() != 2:
                    raise ValueError(f"batched_inputs[{i}]['points'] must be [P, 2], got "
                                     f"{tuple(entry['points'].shape)}")
            if "boxes" in e:
                entry["boxes"] = pp.check_boxes(f"batched_inputs[{i}]['boxes']",
                                                _as_float_tensor(f"batched_inputs[{i}]['boxes']", e["boxes"], 4))
                if entry["boxes"].dim() != 2:
                    raise ValueError(f"batched_inputs[{i}]['boxes'] must be [P, 4], got {tuple(entry['boxes'].shape)}")
            out.append(entry)
        return out

    def entry_prompts(self, entry: dict) -> tuple[str, torch.Tensor]:
        """(prompt_type, prompts [P, 2] | [P, 4] canvas px, fp32) of a checked entry: its points, its boxes, or the
        ``cfg.pts_per_side`` grid of its original extent."""
        if "boxes" in entry:
            return "box", entry["boxes"]
        if "points" in entry:
            return "point", entry["points"]
        n_x, n_y = self.cfg.pts_per_side
        return "point", pp.point_grid(n_x, n_y, entry["height"], entry["width"], self.cfg.image_size)

    def empty_result(self, prompt_type: str, prompts: torch.Tensor, height: int, width: int,
                     dtype: torch.dtype) -> dict:
        """The result of an image without proposals (K' = 0), with every key of a non-empty one."""
        dev = self.device
        return {"proposal": torch.zeros((0, height, width), dtype=dtype, device=dev),
                "scores": torch.zeros(0, dtype=dtype, device=dev),
                "points" if prompt_type == "point" else "boxes": prompts.new_zeros((0, prompts.shape[-1])).to(dev),
                "prompt_index": torch.zeros(0, dtype=torch.int64, device=dev),
                "mask_index": torch.zeros(0, dtype=torch.int64, device=dev)}

    def select(self, pred_masks: torch.Tensor, pred_ious: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
        """The score filter (spec §7.3 steps 1, 3) of one chunk: pred_masks [M, h, w] stride-4 logits, pred_ious [M]
        (once sigmoided) -> (kept masks [M', h, w], their scores sigmoid(pred_iou) [M'], their indices int64 [M'])."""
        scores = pred_ious.sigmoid()
        keep = scores.ge(self.cfg.score_threshold)
        index = torch.nonzero(keep).squeeze(1)
        return pred_masks[index], scores[index], index

    def _canvas(self, masks: torch.Tensor) -> torch.Tensor:
        """Stride-4 logits [M, h, w] -> canvas logits [M, S, S] (bilinear, align_corners False; spec §7.3 step 2)."""
        s = self.cfg.image_size
        return F.interpolate(masks.unsqueeze(0), size=(s, s), mode="bilinear", align_corners=False).squeeze(0)

    def finish(self, masks: torch.Tensor, scores: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
        """Steps 2, 4, 5 on the kept masks [M', h, w] (stride 4) and their scores [M']: upsample to the canvas,
        mmkernels.mask_nms, resize to (max(H, W),) * 2 and crop -> (proposals [K', H, W], NMS order into M' [K']).

        The NMS reads the canvas masks only through their ``nms_downsample`` bilinear downsampling, so that is
        computed here, ``UPSAMPLE_CHUNK`` masks at a time, with the very interpolate call of the official NMS, and
        mask_nms runs with downsample 1 on the result: the same decisions, and only [M', S/d, S/d] is ever held
        (not [M', S, S]). The K' kept masks are upsampled again for the output (the same values)."""
        import mmkernels

        cfg = self.cfg
        if masks.shape[0] == 0:
            return masks.new_zeros((0, height, width)), torch.zeros(0, dtype=torch.int64, device=masks.device)
        d = cfg.nms_downsample
        small = []
        for part in masks.split(UPSAMPLE_CHUNK):
            canvas = self._canvas(part)
            if d > 1:
                canvas = F.interpolate(canvas.unsqueeze(0), scale_factor=1.0 / d, mode="bilinear",
                                       align_corners=False).squeeze(0)
            small.append(canvas)
        order = mmkernels.mask_nms(torch.cat(small), scores, iou_threshold=cfg.nms_iou,
                                   coverage_threshold=cfg.nms_coverage, combine="or", downsample=1)
        del small
        side = max(height, width)
        out = F.interpolate(self._canvas(masks[order]).unsqueeze(0), size=(side, side), mode="bilinear",
                            align_corners=False).squeeze(0)
        return out[:, :height, :width], order

    def postprocess(self, pred_masks: torch.Tensor, pred_ious: torch.Tensor, height: int, width: int) -> dict:
        """The §7.3 post-processing of one image's decoder outputs, filter first: pred_masks [M, h, w] stride-4
        logits (prompt-major, then the K outputs), pred_ious [M] (once sigmoided) -> {"proposal": [K', H, W],
        "scores": [K'], "indices": int64 [K'] into M}."""
        if not isinstance(pred_masks, torch.Tensor) or pred_masks.dim() != 3:
            raise ValueError("'pred_masks' must be a tensor [M, h, w]")
        if not isinstance(pred_ious, torch.Tensor) or tuple(pred_ious.shape) != tuple(pred_masks.shape[:1]):
            raise ValueError(f"'pred_ious' must be a tensor [{pred_masks.shape[0]}] (one per mask)")
        masks, scores, index = self.select(pred_masks, pred_ious)
        proposal, order = self.finish(masks, scores, int(height), int(width))
        return {"proposal": proposal, "scores": scores[order], "indices": index[order]}

    @torch.no_grad()
    def inference(self, batched_inputs) -> list[dict]:
        """``forward(batched_inputs)``: see the module docstring."""
        entries = self.check_batched_inputs(batched_inputs)
        images = torch.stack([e["image"] for e in entries]).to(self.device)
        mask_features, multi_scale = self.image_features(images)
        chunk = self.cfg.points_per_batch
        results = []
        for n, e in enumerate(entries):
            kind, prompts = self.entry_prompts(e)
            height, width = e["height"], e["width"]
            prompts = prompts.to(self.device)
            if prompts.shape[0] == 0:
                results.append(self.empty_result(kind, prompts, height, width, mask_features.dtype))
                continue
            feats = [m[n:n + 1] for m in multi_scale]
            kept_masks, kept_scores, kept_index = [], [], []
            k = None
            for start in range(0, prompts.shape[0], chunk):
                part = prompts[start:start + chunk]
                out = self.decode(mask_features[n:n + 1], feats, part[None], kind, aux_outputs=False)
                pm, pi = out["pred_masks"][0], out["pred_ious"][0]  # [q, K, h, w], [q, K]
                k = pm.shape[1]
                masks, scores, index = self.select(pm.flatten(0, 1), pi.flatten(0, 1))
                kept_masks.append(masks)
                kept_scores.append(scores)
                kept_index.append(index + start * k)
                del out, pm, pi
            masks, scores, index = torch.cat(kept_masks), torch.cat(kept_scores), torch.cat(kept_index)
            proposal, order = self.finish(masks, scores, height, width)
            index = index[order]
            prompt_index = torch.div(index, k, rounding_mode="floor")
            results.append({"proposal": proposal, "scores": scores[order],
                            "points" if kind == "point" else "boxes": prompts[prompt_index],
                            "prompt_index": prompt_index, "mask_index": index % k})
        return results

    def forward(self, batched_inputs: Optional[list] = None, *, images: Optional[torch.Tensor] = None,
                prompts=None, prompt_type: str = "point"):
        """``forward(images=, prompts=, prompt_type=)`` -> the decoder dict (training); ``prompts`` may instead be a
        dict {"point": [N, Q, 2], "box": [N, Q', 4]} (``prompt_type`` is then unused) -> {type: decoder dict} on
        one image-feature pass; ``forward(batched_inputs)`` -> one result dict per image (official inference). See
        the module docstring."""
        if images is not None:
            if batched_inputs is not None:
                raise ValueError("give either 'batched_inputs' (inference) or 'images' + 'prompts', not both")
            if prompts is None:
                raise ValueError("'prompts' are required with 'images' (points [N, Q, 2] or boxes [N, Q, 4])")
            # A dict of prompt types decodes on one encoder pass (training points and boxes): the image features,
            # and the pixel decoder's backward, are shared instead of recomputed per type.
            single = not isinstance(prompts, Mapping)
            if single:
                _check_prompt_type(prompt_type)
                prompts = {prompt_type: prompts}
            elif not prompts or any(k not in PROMPT_TYPES for k in prompts):
                raise ValueError(f"'prompts' as a dict must map prompt types {PROMPT_TYPES} to tensors, got keys "
                                 f"{sorted(map(str, prompts))}")
            mask_features, multi_scale = self.image_features(images)
            out = {kind: self.decode(mask_features, multi_scale, p, kind) for kind, p in prompts.items()}
            return out[prompt_type] if single else out
        if batched_inputs is None:
            raise ValueError("UnpairSegS1.forward needs 'batched_inputs' (inference) or 'images' + 'prompts'")
        if prompts is not None:
            raise ValueError("'prompts' go inside the batched_inputs entries ('points' / 'boxes') at inference")
        return self.inference(batched_inputs)

    # -- friendly entry point -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, image, points=None, boxes=None, grid=None) -> dict:
        """Proposals for one ORIGINAL image.

        Args:
            image: RGB uint8 [H, W, 3] (numpy or tensor), as :func:`preprocess.read_image` returns it.
            points: [P, 2] (x, y) in original pixels, or
            boxes: [P, 4] (x0, y0, x1, y1) in original pixels, or
            grid: n (an n x n grid) or (n_x, n_y); with none of the three, the ``cfg.pts_per_side`` grid.

        Returns:
            {"proposal": [K', H, W] logits, "masks": bool [K', H, W] (sigmoid >= 0.5), "scores": [K'],
            "points" [K', 2] | "boxes" [K', 4] in ORIGINAL pixels (the prompt of each proposal), "prompt_index",
            "mask_index"} on the model's device. Run it under ``torch.autocast`` for bf16, as the official demo.
        """
        img = pp._check_image("image", image)
        given = [name for name, v in (("points", points), ("boxes", boxes), ("grid", grid)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of points, boxes and grid, got {', '.join(given)}")
        h, w = img.shape[:2]
        size = self.cfg.image_size
        entry = pp.prepare(img, size)
        if points is not None:
            p = _as_float_tensor("points", points, 2)
            if p.dim() != 2:
                raise ValueError(f"'points' must be [P, 2], got {tuple(p.shape)}")
            entry["points"] = pp.to_canvas(p, h, w, size)
        elif boxes is not None:
            b = pp.check_boxes("boxes", _as_float_tensor("boxes", boxes, 4))
            if b.dim() != 2:
                raise ValueError(f"'boxes' must be [P, 4], got {tuple(b.shape)}")
            entry["boxes"] = pp.to_canvas(b, h, w, size)
        elif grid is not None:
            if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
                n_x = n_y = int(grid)
            elif isinstance(grid, (list, tuple)) and len(grid) == 2:
                n_x, n_y = grid
            else:
                raise ValueError(f"'grid' must be an int n or a pair (n_x, n_y), got {grid!r}")
            entry["points"] = pp.point_grid(n_x, n_y, h, w, size)
        res = self.inference([entry])[0]
        key = "boxes" if "boxes" in res else "points"
        res[key] = pp.from_canvas(res[key].float().cpu(), h, w, size).to(res["proposal"].device)
        res["masks"] = res["proposal"].sigmoid().ge(0.5)
        return res


__all__ = ["UnpairSegS1", "SemSegHead", "IN_FEATURES"]
