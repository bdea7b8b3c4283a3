"""Image/video pair manifests (JSONL) for LaVin-DiT in-context data: a writer and a loader.

Layout that :func:`write_manifest` writes and :class:`ManifestDataset` reads::

    out_dir/manifest.jsonl                         one JSON record per (input, target) pair
    out_dir/<task>/<sample>-<slot>_input.png       image tasks (RGB PNG, 8 bit)
    out_dir/<task>/<sample>-<slot>_target.png
    out_dir/<task>/<sample>-<slot>_input/0000.png  video tasks: a folder of PNG frames, in name order
    out_dir/<task>/<sample>-<slot>_target/...

A record is ``{"task", "input", "target"}`` (paths relative to the manifest's folder, or absolute), plus what the
writer knows: ``"sample"`` and ``"slot"`` (the dataset index and pair position; the query is slot k) and ``"scene"``
(the ShapesWorld scene or clip index). The loader needs only the first three, so hand-made manifests work too.

Video format: the writer stores frames as PNG folders, always. MP4 (H.264 with 4:2:0 chroma, or any lossy codec)
would blur exact masks, edges and box outlines, and would make the result depend on whether PyAV is installed. The
loader reads frame folders and, for real data, video files (.mp4, .webm, .mkv, .avi, .mov) through PyAV when it is
importable (``pip install av``); without it such a record raises ImportError naming the file.

Every image task's folder is also an official LaVin-DiT template folder (``*_input.png`` / ``*_target.png`` whose
names share the prefix before the first "_"), usable as ``inference.py --task_dir``.

Preprocessing follows the official inference (specs/lavin_dit.md §4): RGB, bicubic antialiased resize to ``size``
(Pillow; skipped when the image already has that size), uint8 -> ``x / 255`` -> ``(x - 0.5) * 2``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from models.common.media import VIDEO_SUFFIXES, load_media, to_uint8  # noqa: F401 (re-exported)

from .lavin_tasks import VIDEO_TASKS, check_index, check_k, check_length, check_size, schedule

MANIFEST = "manifest.jsonl"
_MANIFEST_STREAM = 0x3A1F


def _save(path: Path, x: torch.Tensor, as_frames: bool) -> None:
    frames = to_uint8(x)
    if not as_frames:
        Image.fromarray(frames[0]).save(path, compress_level=1)
        return
    path.mkdir(parents=True, exist_ok=True)
    for t, f in enumerate(frames):
        Image.fromarray(f).save(path / f"{t:04d}.png", compress_level=1)


def write_manifest(out_dir: Union[str, os.PathLike], dataset, n: int) -> Path:
    """Write the first ``n`` samples of ``dataset`` (items as returned by :class:`InContextDataset`) as PNG files
    plus ``out_dir/manifest.jsonl`` with one record per pair (k examples, then the query). Returns the manifest path.
    The manifest is written last, via a temporary file and a rename, so a complete manifest never lists missing
    files."""
    n = check_length(n)
    if n > len(dataset):
        raise ValueError(f"write_manifest: 'n' = {n} exceeds the dataset length {len(dataset)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        s = dataset[i]
        task, k = s["task"], s["inputs"].shape[0]
        (out / task).mkdir(exist_ok=True)
        pairs = [(s["inputs"][j], s["targets"][j]) for j in range(k)] + [(s["query"], s["target"])]
        for j, (a, b) in enumerate(pairs):
            as_frames = task in VIDEO_TASKS or a.shape[1] > 1
            ext = "" if as_frames else ".png"
            rec = {"task": task, "input": f"{task}/{i:06d}-{j}_input{ext}", "target": f"{task}/{i:06d}-{j}_target{ext}",
                   "sample": i, "slot": j}
            if "scenes" in s:
                rec["scene"] = int(s["scenes"][j])
            _save(out / rec["input"], a, as_frames)
            _save(out / rec["target"], b, as_frames)
            lines.append(json.dumps(rec))
    path = out / MANIFEST
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    return path


class ManifestDataset(Dataset):
    """In-context samples from a JSONL pair manifest, sampled like :class:`InContextDataset`.

    Args:
        path: the manifest file, or a folder holding ``manifest.jsonl``.
        k: example pairs per sample: an int, or an inclusive range (lo, hi).
        size: (H, W) to resize every image to (None keeps the stored size, which must then agree within a sample).
        length: the number of samples (default: the number of records).
        tasks: the tasks to sample (default: every task in the manifest, in order of first appearance).
        seed: the sampling seed.

    Sample ``i`` has task ``tasks[i % len(tasks)]`` and ``k = ks[(i // len(tasks)) % len(ks)]``; its k + 1 distinct
    records are drawn from that task's records with a generator seeded from (seed, i), the query last. Items are dicts
    like InContextDataset's, with ``records`` int64 [k + 1] (indices into ``self.records``) instead of ``scenes``.
    """

    def __init__(self, path: Union[str, os.PathLike], k: Union[int, tuple] = (1, 4), size=None,
                 length: Optional[int] = None, tasks: Optional[Sequence[str]] = None, seed: int = 0):
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"ManifestDataset: manifest {path} does not exist")
        self.root = path.parent
        self.records: list[dict] = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if not all(isinstance(rec.get(key), str) for key in ("task", "input", "target")):
                    raise ValueError(f"ManifestDataset: {path}:{line_no} must have string fields 'task', 'input' and "
                                     f"'target', got {rec!r}")
                self.records.append(rec)
        self.pools: dict[str, list[int]] = {}
        for r, rec in enumerate(self.records):
            self.pools.setdefault(rec["task"], []).append(r)
        if tasks is None:
            tasks = tuple(self.pools)
        else:
            if isinstance(tasks, str):
                raise TypeError(f"ManifestDataset: 'tasks' must be a list of task names, got the str {tasks!r}")
            tasks = tuple(tasks)
            missing = [t for t in tasks if t not in self.pools]
            if missing:
                raise ValueError(f"ManifestDataset: 'tasks' {missing!r} not in the manifest, which has "
                                 f"{tuple(self.pools)}")
        if not tasks:
            raise ValueError(f"ManifestDataset: manifest {path} has no records")
        self.ks = check_k(k)
        for t in tasks:
            if len(self.pools[t]) < self.ks[-1] + 1:
                raise ValueError(f"ManifestDataset: task {t!r} has {len(self.pools[t])} records, fewer than "
                                 f"k + 1 = {self.ks[-1] + 1}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"ManifestDataset: 'seed' must be a non-negative int, got {seed!r}")
        self.tasks, self.size, self.seed = tasks, check_size(size), seed
        self.length = len(self.records) if length is None else check_length(length)

    def __len__(self) -> int:
        return self.length

    def key(self, i: int) -> tuple[str, int]:
        """(task, k) of sample ``i``, without loading it."""
        return schedule(check_index(i, self.length), self.tasks, self.ks)

    def _path(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.root / q

    def pair(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Record ``r``'s (input, target), each float32 [3, T, H, W] in [-1, 1]."""
        rec = self.records[r]
        return load_media(self._path(rec["input"]), self.size), load_media(self._path(rec["target"]), self.size)

    def __getitem__(self, i: int) -> dict:
        i = check_index(i, self.length)
        task, k = schedule(i, self.tasks, self.ks)
        rng = np.random.default_rng(np.random.SeedSequence([_MANIFEST_STREAM, self.seed, i]))
        pool = self.pools[task]
        chosen = [pool[j] for j in rng.choice(len(pool), size=k + 1, replace=False)]
        pairs = [self.pair(r) for r in chosen]
        shapes = {tuple(t.shape) for p in pairs for t in p}
        if len(shapes) != 1:
            raise ValueError(f"ManifestDataset: sample {i} (task {task!r}, records {chosen}) mixes shapes "
                             f"{sorted(shapes)}; pass 'size' to resize, and keep one frame count per task")
        return {"task": task, "inputs": torch.stack([a for a, _ in pairs[:k]]),
                "targets": torch.stack([b for _, b in pairs[:k]]), "query": pairs[k][0], "target": pairs[k][1],
                "records": torch.tensor(chosen, dtype=torch.int64), "index": i}
