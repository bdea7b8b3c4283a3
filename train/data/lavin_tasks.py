"""LaVin-DiT in-context tasks on ShapesWorld.

A LaVin-DiT sample is a "visual sentence" (specs/lavin_dit.md §4): k (input, target) example pairs of one task, then
a query input; the model predicts the query's target. :class:`InContextDataset` makes such samples from ShapesWorld,
where every target is exact ground truth.

Tensors: every input and target is float32 [3, T, H, W] in [-1, 1] (the official preprocessing maps uint8 to
``(x / 255 - 0.5) * 2``). Masks, edges and depth are grey images (the same value in the 3 channels), as the official
task templates are RGB images. T = 1 for image tasks and T = ``frames`` = 1 + 4m for video tasks (the ST-VAE's causal
frame count).

Tasks (``TASKS``); each maps a ShapesWorld scene (image tasks) or clip (video tasks) to (input, target):

==============================  ===================================  ==============================================
task                            input                                target
==============================  ===================================  ==============================================
foreground_segmentation         render                               foreground mask, white on black
depth_estimation                render                               nearness ``1 - depth``: near bright, far dark
edge_detection                  render                               instance/foreground boundaries, white on black
colorization                    grey render (BT.601 luma in RGB)     render
inpainting                      render with a black rectangle        render
denoising                       clip(render + N(0, sigma^2), 0, 1)   render
box_detection                   render                               render with each visible object's box outline
video_frame_prediction          frames 0..T-1 of a clip              frames T..2T-1 of the same clip
video_foreground_segmentation   a clip                               its per-frame foreground masks
==============================  ===================================  ==============================================

Sampling (deterministic in (world.seed, dataset seed, i)): sample ``i`` has task ``tasks[i % len(tasks)]`` and
``k = ks[(i // len(tasks)) % len(ks)]`` where ``ks`` lists the allowed pair counts, so (task, k) of any index is known
without rendering. Its k + 1 scene indices are distinct draws from ``scenes`` = [lo, hi); the last one is the query.
Per-pair randomness (inpainting hole, noise level) comes from a child of the sample's seed sequence.

Batching mixed tasks: tensors of one batch must share k and T, so batch samples of one (task, k) key:
:class:`GroupedBatchSampler` groups indices by ``dataset.key(i)`` and :func:`collate` stacks a batch (and refuses a
mixed one). :func:`visual_sentence` interleaves pairs and query into the official condition order.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from models.common.media import check_size

from .shapes import ShapesWorld

IMAGE_TASKS = ("foreground_segmentation", "depth_estimation", "edge_detection", "colorization", "inpainting",
               "denoising", "box_detection")
VIDEO_TASKS = ("video_frame_prediction", "video_foreground_segmentation")
TASKS = IMAGE_TASKS + VIDEO_TASKS
BINARY_TASKS = frozenset({"foreground_segmentation", "edge_detection", "video_foreground_segmentation"})

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")
BOX_COLOUR = (1.0, 0.0, 1.0)  # magenta: no palette colour, so every outline pixel is recognisable
HOLE_FRACTION = (0.25, 0.5)  # inpainting hole side, as a fraction of the image side
NOISE_SIGMA = (0.05, 0.25)  # denoising noise std in [0, 1] image units
_DATASET_STREAM = 0x1A71D17


def _grey(x: np.ndarray) -> np.ndarray:
    """[..., H, W] -> [..., H, W, 3] float32."""
    return np.repeat(np.asarray(x, dtype=np.float32)[..., None], 3, axis=-1)


def box_thickness(size: tuple[int, int]) -> int:
    return max(1, round(min(size) / 64))


def draw_boxes(image: np.ndarray, boxes: np.ndarray, colour=BOX_COLOUR) -> np.ndarray:
    """A copy of ``image`` [H, W, 3] with the outline of every (x0, y0, x1, y1) end-exclusive box (rows with x0 < 0
    skipped) drawn inside the box, ``box_thickness`` pixels wide."""
    out = image.copy()
    t = box_thickness(image.shape[:2])
    for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
        if x0 < 0:
            continue
        out[y0:min(y0 + t, y1), x0:x1] = colour
        out[max(y1 - t, y0):y1, x0:x1] = colour
        out[y0:y1, x0:min(x0 + t, x1)] = colour
        out[y0:y1, max(x1 - t, x0):x1] = colour
    return out


def make_pair(world: ShapesWorld, task: str, index: int, rng: np.random.Generator, frames: int = 5
              ) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) of ``task`` on scene / clip ``index`` of ``world``: float32 [T, H, W, 3] in [0, 1].
    ``rng`` supplies the task's own randomness (hole, noise); ``frames`` is T for video tasks."""
    if task in VIDEO_TASKS:
        if task == "video_frame_prediction":
            video = world.clip(index, 2 * frames).video
            return video[:frames], video[frames:]
        clip = world.clip(index, frames)
        return clip.video, _grey(clip.instance > 0)
    if task not in IMAGE_TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    scene = world.scene(index)
    img = scene.image
    if task == "foreground_segmentation":
        inp, tgt = img, _grey(scene.foreground)
    elif task == "depth_estimation":
        inp, tgt = img, _grey(1.0 - scene.depth)
    elif task == "edge_detection":
        inp, tgt = img, _grey(scene.edges)
    elif task == "colorization":
        inp, tgt = _grey(img @ np.asarray(LUMA, dtype=np.float32)), img
    elif task == "inpainting":
        h, w = scene.size
        hh = int(round(rng.uniform(*HOLE_FRACTION) * h))
        ww = int(round(rng.uniform(*HOLE_FRACTION) * w))
        y0, x0 = int(rng.integers(0, h - hh + 1)), int(rng.integers(0, w - ww + 1))
        inp = img.copy()
        inp[y0:y0 + hh, x0:x0 + ww] = 0.0
        tgt = img
    elif task == "denoising":
        sigma = rng.uniform(*NOISE_SIGMA)
        inp = np.clip(img + sigma * rng.standard_normal(img.shape), 0.0, 1.0).astype(np.float32)
        tgt = img
    else:  # box_detection
        inp, tgt = img, draw_boxes(img, scene.boxes)
    return inp[None], tgt[None]


def to_model(x: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] in [0, 1] -> float32 [3, T, H, W] in [-1, 1]."""
    return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(3, 0, 1, 2) * 2 - 1).contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# Sampling schedule shared with the manifest loader


def check_k(k) -> tuple[int, ...]:
    """``k``: an int >= 1 or an inclusive (lo, hi) range -> the tuple of allowed pair counts."""
    if isinstance(k, (int, np.integer)) and not isinstance(k, bool):
        if k < 1:
            raise ValueError(f"'k' (pairs per sample) must be >= 1, got {k}")
        return (int(k),)
    if (isinstance(k, Sequence) and len(k) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in k) and 1 <= k[0] <= k[1]):
        return tuple(range(int(k[0]), int(k[1]) + 1))
    raise ValueError(f"'k' (pairs per sample) must be an int >= 1 or a range (lo, hi) with 1 <= lo <= hi, got {k!r}")


def check_length(length) -> int:
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"'length' must be a non-negative int, got {length!r}")
    return int(length)


def schedule(i: int, tasks: Sequence[str], ks: Sequence[int]) -> tuple[str, int]:
    """(task, k) of sample ``i``: round robin over tasks, then over k (see the module docstring)."""
    return tasks[i % len(tasks)], ks[(i // len(tasks)) % len(ks)]


def check_index(i, length: int) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"dataset index must be an int, got {type(i).__name__}")
    if not 0 <= i < length:
        raise IndexError(f"dataset index {i} out of range for length {length}")
    return int(i)


class InContextDataset(Dataset):
    """LaVin-DiT in-context samples on ShapesWorld (see the module docstring).

    Args:
        world: the ShapesWorld; rendered at ``size`` (default: the world's own size).
        tasks: task names (default: all of ``TASKS``).
        k: example pairs per sample: an int, or an inclusive range (lo, hi).
        size: (H, W) of every image.
        length: the number of samples.
        frames: T of video tasks, 1 + 4m.
        seed: the dataset seed (mixed with the world's).
        scenes: [lo, hi) range of scene indices to draw from (disjoint ranges give disjoint train/val scenes).

    Item ``i`` is a dict: ``task`` (str), ``inputs`` and ``targets`` [k, 3, T, H, W], ``query`` and ``target``
    [3, T, H, W] (float32 in [-1, 1]), ``scenes`` int64 [k + 1] (the scene or clip indices, the query's last) and
    ``index`` (int).
    """

    def __init__(self, world: ShapesWorld, tasks: Optional[Sequence[str]] = None, k: Union[int, tuple] = (1, 4),
                 size=None, length: int = 10000, frames: int = 5, seed: int = 0,
                 scenes: tuple[int, int] = (0, 2 ** 31)):
        if not isinstance(world, ShapesWorld):
            raise TypeError(f"InContextDataset: 'world' must be a ShapesWorld, got {type(world).__name__}")
        tasks = TASKS if tasks is None else tuple(tasks)
        if isinstance(tasks, str) or not tasks or any(t not in TASKS for t in tasks):
            raise ValueError(f"InContextDataset: 'tasks' must be a non-empty list of names from {TASKS}, got {tasks!r}")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
            raise ValueError(f"InContextDataset: 'frames' must be 1 + 4m (m >= 0), got {frames!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"InContextDataset: 'seed' must be a non-negative int, got {seed!r}")
        lo, hi = scenes
        if not (0 <= lo < hi):
            raise ValueError(f"InContextDataset: 'scenes' must be a range (lo, hi) with 0 <= lo < hi, got {scenes!r}")
        self.ks = check_k(k)
        if hi - lo < self.ks[-1] + 1:
            raise ValueError(f"InContextDataset: 'scenes' range {scenes} holds fewer than k + 1 = {self.ks[-1] + 1} "
                             "scenes")
        size = check_size(size)
        self.world = world if size is None else world.resized(size)
        self.tasks, self.frames, self.seed, self.scenes = tasks, frames, seed, (int(lo), int(hi))
        self.length = check_length(length)

    def __len__(self) -> int:
        return self.length

    @property
    def size(self) -> tuple[int, int]:
        return self.world.size

    def key(self, i: int) -> tuple[str, int]:
        """(task, k) of sample ``i``, without rendering it."""
        return schedule(check_index(i, self.length), self.tasks, self.ks)

    def __getitem__(self, i: int) -> dict:
        i = check_index(i, self.length)
        task, k = schedule(i, self.tasks, self.ks)
        seq = np.random.SeedSequence([self.world.seed, _DATASET_STREAM, self.seed, i])
        rng = np.random.default_rng(seq)
        lo, hi = self.scenes
        chosen: list[int] = []
        while len(chosen) < k + 1:  # distinct scenes; collisions are rare in the default range
            s = int(rng.integers(lo, hi))
            if s not in chosen:
                chosen.append(s)
        pairs = [make_pair(self.world, task, s, np.random.default_rng(child), self.frames)
                 for s, child in zip(chosen, seq.spawn(k + 1))]
        ins = [to_model(a) for a, _ in pairs]
        tgts = [to_model(b) for _, b in pairs]
        return {"task": task, "inputs": torch.stack(ins[:k]), "targets": torch.stack(tgts[:k]), "query": ins[k],
                "target": tgts[k], "scenes": torch.tensor(chosen, dtype=torch.int64), "index": i}


# ---------------------------------------------------------------------------------------------------------------------
# Batching


def collate(batch: Sequence[dict]) -> dict:
    """Stack samples of one task and shape: tensors gain a leading batch dim, ``task`` stays a str, ``index``
    becomes int64 [B]. Raises ValueError for a mixed batch (group with :class:`GroupedBatchSampler`)."""
    if not batch:
        raise ValueError("collate: empty batch")
    tasks = {b["task"] for b in batch}
    if len(tasks) != 1:
        raise ValueError(f"collate: a batch must hold one task, got {sorted(tasks)}; batch with GroupedBatchSampler")
    out = {"task": batch[0]["task"]}
    for name, v in batch[0].items():
        if name == "task":
            continue
        if isinstance(v, torch.Tensor):
            shapes = {tuple(b[name].shape) for b in batch}
            if len(shapes) != 1:
                raise ValueError(f"collate: '{name}' has different shapes in one batch: {sorted(shapes)}; samples of "
                                 "one batch need the same k and T (batch with GroupedBatchSampler)")
            out[name] = torch.stack([b[name] for b in batch])
        else:
            out[name] = torch.tensor([b[name] for b in batch])
    return out


class GroupedBatchSampler(Sampler):
    """Batches of indices that share ``dataset.key(i)`` = (task, k), so that :func:`collate` can stack them.

    Each epoch visits every index once: indices are (optionally) shuffled, split by key in that order, cut into
    batches of ``batch_size`` (a shorter last batch per key unless ``drop_last``), and the batches are shuffled.
    Deterministic in (seed, epoch); call :meth:`set_epoch` between epochs.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"GroupedBatchSampler: 'batch_size' must be an int >= 1, got {batch_size!r}")
        if not hasattr(dataset, "key"):
            raise TypeError("GroupedBatchSampler: 'dataset' must have key(i) -> (task, k)")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[list[int]]:
        n = len(self.dataset)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        groups: dict = {}
        for i in order.tolist():
            groups.setdefault(self.dataset.key(i), []).append(i)
        batches = []
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                b = idx[s:s + self.batch_size]
                if len(b) == self.batch_size or not self.drop_last:
                    batches.append(b)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def visual_sentence(inputs: torch.Tensor, targets: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The official condition order [in_1, tgt_1, ..., in_k, tgt_k, query]: inputs/targets [..., k, 3, T, H, W],
    query [..., 3, T, H, W] -> [..., 2k + 1, 3, T, H, W] (each element is encoded on its own by the VAE)."""
    if inputs.shape != targets.shape or inputs.shape[:-5] + inputs.shape[-4:] != query.shape:
        raise ValueError(f"visual_sentence: expected inputs and targets [..., k, 3, T, H, W] and query "
                         f"[..., 3, T, H, W], got {tuple(inputs.shape)}, {tuple(targets.shape)}, {tuple(query.shape)}")
    pairs = torch.stack((inputs, targets), dim=-5).flatten(-6, -5)
    return torch.cat((pairs, query.unsqueeze(-5)), dim=-5)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics


def task_metrics(task: str, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample metrics of predictions ``pred`` vs ``target``, both [..., 3, T, H, W] in [-1, 1].

    Returns tensors of the batch shape ``...``: ``mse`` (in [-1, 1] units) and ``psnr`` (dB, peak-to-peak 2, i.e. the
    PSNR of the [0, 1] images; inf for a perfect prediction) for every task, and for binary tasks
    (``BINARY_TASKS``) ``iou`` of the masks ``mean over channels > 0`` (1 when both masks are empty).
    """
    if task not in TASKS:
        raise ValueError(f"task_metrics: 'task' must be one of {TASKS}, got {task!r}")
    if pred.shape != target.shape or pred.dim() < 4 or pred.shape[-4] != 3:
        raise ValueError(f"task_metrics: 'pred' and 'target' must both be [..., 3, T, H, W], got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.float(), target.float()
    mse = (pred - target).pow(2).mean(dim=(-4, -3, -2, -1))
    out = {"mse": mse, "psnr": 10 * torch.log10(4.0 / mse)}
    if task in BINARY_TASKS:
        p, t = pred.mean(-4) > 0, target.mean(-4) > 0
        inter = (p & t).sum(dim=(-3, -2, -1)).double()
        union = (p | t).sum(dim=(-3, -2, -1)).double()
        out["iou"] = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).float()
    return out

