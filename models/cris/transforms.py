"""CRIS preprocessing and post-processing: the official letterbox affine transform and its inverse (spec §5.2, §5.4).

Every image, whatever its size ``(h, w)``, is mapped into a ``size x size`` square (416 officially) by the affine
matrix ``M = [[s, 0, bx], [0, s, by]]`` with ``s = min(size / h, size / w)``, ``bx = (size - w s) / 2`` and
``by = (size - h s) / 2`` (un-rounded: the content box need not start on a pixel boundary). The official code does
not write that matrix down: it builds it with ``cv2.getAffineTransform`` from three *float32* point pairs,
``(0, 0) -> (bx, by)``, ``(w, 0) -> (w s + bx, by)``, ``(0, h) -> (bx, h s + by)``, and the inverse from the swapped
pairs. The float32 rounding of the points makes ``M`` differ from the closed form in the last bits, so
:func:`letterbox_matrix` builds it the same way, with OpenCV, and the values match the official ones bit for bit.

Layouts: images are ``uint8 [h, w, 3]`` RGB (HWC, as decoded), masks ``uint8 [h, w]`` (0 / 255, or any non-zero for
the object) or ``bool [h, w]``; model inputs are ``float32 [3, S, S]`` (CHW), probabilities and logits ``[..., H', W']``
at any resolution (104 x 104 for CRIS). Matrices are ``float64 [2, 3]`` numpy arrays (tensors are accepted too).

* :func:`letterbox_image`: ``cv2.warpAffine`` with bicubic interpolation and a constant border of ``255 * CLIP mean``
  (on uint8 that is RGB (123, 117, 104)), then ``/ 255``, minus the CLIP mean, over the CLIP std (float32, in the
  official order of operations).
* :func:`letterbox_mask`: the training target: bilinear warp, border 0, ``/ 255`` -> a soft mask in [0, 1].
* :func:`unletterbox_prob` and :func:`predict_mask`: the official evaluation path: probabilities are resized to
  ``S x S`` (bicubic, ``align_corners=True``) when they are not already that size, warped back to ``(h, w)`` with
  ``M_inv`` (bicubic, border 0) and thresholded with a strict ``prob > 0.35``.

OpenCV (``opencv-python-headless``) is imported lazily, inside the functions, so importing this module needs none.
OpenCV is needed for bit-exact preprocessing: its warpAffine quantises source coordinates to 1/32 pixel and uses
fixed-point weights on uint8 images, which no torch or PIL resize reproduces.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INPUT_SIZE = 416
THRESHOLD = 0.35

Array = Union[np.ndarray, torch.Tensor]


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("models.cris.transforms needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def _positive_int(name: str, fn: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{fn}: '{name}' must be a positive int, got {v!r}")
    return int(v)


def _matrix(name: str, fn: str, m) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().cpu().numpy()
    if not isinstance(m, np.ndarray):
        raise TypeError(f"{fn}: '{name}' must be a numpy array or tensor [2, 3], got {type(m).__name__}")
    if m.shape != (2, 3) or not np.issubdtype(m.dtype, np.floating):
        raise ValueError(f"{fn}: '{name}' must be a float [2, 3] affine matrix, got {m.dtype} {tuple(m.shape)}")
    return np.ascontiguousarray(m, dtype=np.float64)


def _ori_size(name: str, fn: str, v) -> tuple[int, int]:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, Sequence) or len(v) != 2:
        raise ValueError(f"{fn}: '{name}' must be a pair (h, w) of positive ints, got {v!r}")
    return _positive_int(f"{name}[0]", fn, v[0]), _positive_int(f"{name}[1]", fn, v[1])


def letterbox_matrix(h: int, w: int, size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``(M, M_inv)``, float64 [2, 3] each: the official letterbox of an ``h x w`` image into ``size x size``.

    Exactly the official ``getTransformMat``: ``cv2.getAffineTransform`` on the float32 point pairs of the module
    docstring (``M``), and on the swapped pairs (``M_inv``, which maps letterboxed pixels back to the original)."""
    fn = "letterbox_matrix"
    h, w, size = _positive_int("h", fn, h), _positive_int("w", fn, w), _positive_int("size", fn, size)
    cv2 = _cv2()
    scale = min(size / h, size / w)
    new_h, new_w = h * scale, w * scale
    bx, by = (size - new_w) / 2.0, (size - new_h) / 2.0
    src = np.array([[0, 0], [w, 0], [0, h]], np.float32)
    dst = np.array([[bx, by], [new_w + bx, by], [bx, new_h + by]], np.float32)
    return cv2.getAffineTransform(src, dst), cv2.getAffineTransform(dst, src)


def warp_image(img_rgb_uint8: np.ndarray, M, size: int = INPUT_SIZE) -> np.ndarray:
    """The letterboxed uint8 image [size, size, 3] before normalisation (bicubic, pad colour 255 * CLIP mean)."""
    fn = "warp_image"
    if not isinstance(img_rgb_uint8, np.ndarray):
        raise TypeError(f"{fn}: 'img_rgb_uint8' must be a numpy array, got {type(img_rgb_uint8).__name__}")
    if img_rgb_uint8.dtype != np.uint8 or img_rgb_uint8.ndim != 3 or img_rgb_uint8.shape[2] != 3:
        raise ValueError(f"{fn}: 'img_rgb_uint8' must be uint8 [h, w, 3] (RGB), got {img_rgb_uint8.dtype} "
                         f"{tuple(img_rgb_uint8.shape)}")
    if img_rgb_uint8.shape[0] < 1 or img_rgb_uint8.shape[1] < 1:
        raise ValueError(f"{fn}: 'img_rgb_uint8' must not be empty, got {tuple(img_rgb_uint8.shape)}")
    M, size = _matrix("M", fn, M), _positive_int("size", fn, size)
    cv2 = _cv2()
    # A float border value on a uint8 image is saturate-cast by OpenCV: (122.77, 116.75, 104.09) -> (123, 117, 104).
    border = [CLIP_MEAN[0] * 255, CLIP_MEAN[1] * 255, CLIP_MEAN[2] * 255]
    return cv2.warpAffine(np.ascontiguousarray(img_rgb_uint8), M, (size, size), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def normalize(img_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W]: ``x / 255``, minus the CLIP mean, over the CLIP std (in float32,
    in that order, as the official ``convert``)."""
    x = torch.from_numpy(np.ascontiguousarray(img_uint8.transpose(2, 0, 1))).float()
    mean = torch.tensor(CLIP_MEAN).reshape(3, 1, 1)
    std = torch.tensor(CLIP_STD).reshape(3, 1, 1)
    return x.div_(255.0).sub_(mean).div_(std)


def letterbox_image(img_rgb_uint8: np.ndarray, M, size: int = INPUT_SIZE) -> torch.Tensor:
    """The model input: float32 [3, size, size], letterboxed with ``M`` (from :func:`letterbox_matrix`) and
    normalised with the CLIP mean and std."""
    return normalize(warp_image(img_rgb_uint8, M, size))


def letterbox_mask(mask_u8: np.ndarray, M, size: int = INPUT_SIZE) -> torch.Tensor:
    """The soft training target: float32 [size, size] in [0, 1] = bilinear warp (border 0) of ``mask_u8`` / 255.

    ``mask_u8``: uint8 [h, w] as stored (255 on the object; the official overlapping-polygon value 254 gives a target
    of 254/255), or bool [h, w] (taken as 0 / 255)."""
    fn = "letterbox_mask"
    if not isinstance(mask_u8, np.ndarray):
        raise TypeError(f"{fn}: 'mask_u8' must be a numpy array, got {type(mask_u8).__name__}")
    if mask_u8.dtype == np.bool_:
        mask_u8 = mask_u8.astype(np.uint8) * 255
    if mask_u8.dtype != np.uint8 or mask_u8.ndim != 2 or 0 in mask_u8.shape:
        raise ValueError(f"{fn}: 'mask_u8' must be uint8 or bool [h, w], non-empty, got {mask_u8.dtype} "
                         f"{tuple(mask_u8.shape)}")
    M, size = _matrix("M", fn, M), _positive_int("size", fn, size)
    cv2 = _cv2()
    out = cv2.warpAffine(np.ascontiguousarray(mask_u8), M, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    # The official code divides in float64 (numpy) and then converts to float32 (torch .float()).
    return torch.from_numpy(out / 255.0).float()


def _resize_probs(prob: torch.Tensor, size: int) -> torch.Tensor:
    """[B, H', W'] float32 -> [B, size, size]; bicubic align_corners=True, skipped when already that size (as the
    official ``if pred.shape[-2:] != img.shape[-2:]``)."""
    if tuple(prob.shape[-2:]) == (size, size):
        return prob
    return F.interpolate(prob[:, None], size=(size, size), mode="bicubic", align_corners=True)[:, 0]


def _warp_back(prob_np: np.ndarray, M_inv: np.ndarray, ori: tuple[int, int]) -> np.ndarray:
    cv2 = _cv2()
    h, w = ori
    return cv2.warpAffine(np.ascontiguousarray(prob_np, dtype=np.float32), M_inv, (w, h), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def unletterbox_prob(prob: Array, M_inv, ori_size, size: int = INPUT_SIZE) -> torch.Tensor:
    """Probabilities in letterbox space -> float32 [h, w] at the original resolution ``ori_size = (h, w)``.

    ``prob``: [H', W'] (or [1, H', W'], [1, 1, H', W']) probabilities (already passed through the sigmoid), a tensor
    or numpy array at any resolution; resized to ``size x size`` (bicubic, align_corners=True) unless already that
    size, then warped with ``M_inv`` (bicubic, border 0). The cubic kernel can overshoot [0, 1] slightly near edges;
    the values are returned unclipped, as the official code thresholds them unclipped."""
    fn = "unletterbox_prob"
    if isinstance(prob, np.ndarray):
        prob = torch.from_numpy(prob)
    if not isinstance(prob, torch.Tensor):
        raise TypeError(f"{fn}: 'prob' must be a tensor or numpy array, got {type(prob).__name__}")
    while prob.dim() > 2 and prob.shape[0] == 1:
        prob = prob[0]
    if prob.dim() != 2 or 0 in prob.shape or not prob.is_floating_point():
        raise ValueError(f"{fn}: 'prob' must be a non-empty float map [H, W] (or [1, H, W], [1, 1, H, W]), got "
                         f"{prob.dtype} {tuple(prob.shape)}")
    M_inv, ori = _matrix("M_inv", fn, M_inv), _ori_size("ori_size", fn, ori_size)
    size = _positive_int("size", fn, size)
    p = _resize_probs(prob.detach().float()[None], size)[0]
    return torch.from_numpy(_warp_back(p.cpu().numpy(), M_inv, ori))


def predict_mask(logits: torch.Tensor, M_inv: Sequence, ori_sizes: Sequence, threshold: float = THRESHOLD,
                 size: int = INPUT_SIZE) -> list[torch.Tensor]:
    """Binary masks at the original resolutions: ``sigmoid(logits)`` -> bicubic to ``size`` (align_corners=True) ->
    inverse letterbox (bicubic, border 0) -> ``prob > threshold`` (strict, as official).

    Args:
        logits: [B, 1, H', W'] (or [B, H', W']) raw model outputs (CRIS: [B, 1, 104, 104]), any float dtype; the
            post-processing runs in float32 (the official evaluation is fp32).
        M_inv: B inverse matrices [2, 3] (numpy or tensors), from :func:`letterbox_matrix`.
        ori_sizes: B pairs (h, w).
        threshold: the probability threshold (official 0.35).
        size: the letterbox side the model saw (official 416).

    Returns: a list of B bool tensors [h_b, w_b] (on the CPU)."""
    fn = "predict_mask"
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: 'logits' must be a tensor, got {type(logits).__name__}")
    if logits.dim() == 4:
        if logits.shape[1] != 1:
            raise ValueError(f"{fn}: 'logits' must be [B, 1, H, W], got {tuple(logits.shape)}")
        logits = logits[:, 0]
    if logits.dim() != 3 or 0 in logits.shape[1:] or not logits.is_floating_point():
        raise ValueError(f"{fn}: 'logits' must be a float [B, 1, H, W] or [B, H, W] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    b = logits.shape[0]
    if isinstance(M_inv, (np.ndarray, torch.Tensor)) and M_inv.ndim == 3:
        M_inv = list(M_inv)
    if not isinstance(M_inv, Sequence) or len(M_inv) != b:
        raise ValueError(f"{fn}: 'M_inv' must hold one [2, 3] matrix per sample ({b}), got "
                         f"{len(M_inv) if isinstance(M_inv, Sequence) else type(M_inv).__name__}")
    if isinstance(ori_sizes, (np.ndarray, torch.Tensor)) and ori_sizes.ndim == 2:
        ori_sizes = ori_sizes.tolist()
    if not isinstance(ori_sizes, Sequence) or len(ori_sizes) != b:
        raise ValueError(f"{fn}: 'ori_sizes' must hold one (h, w) per sample ({b}), got {ori_sizes!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{fn}: 'threshold' must be a float, got {type(threshold).__name__}")
    mats = [_matrix(f"M_inv[{i}]", fn, m) for i, m in enumerate(M_inv)]
    oris = [_ori_size(f"ori_sizes[{i}]", fn, o) for i, o in enumerate(ori_sizes)]
    size = _positive_int("size", fn, size)
    if b == 0:
        return []
    probs = _resize_probs(torch.sigmoid(logits.detach().float()), size).cpu().numpy()
    return [torch.from_numpy(_warp_back(p, m, o) > threshold) for p, m, o in zip(probs, mats, oris)]
