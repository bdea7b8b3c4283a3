"""Training data: the ShapesWorld generator (``shapes``), LaVin-DiT in-context tasks on it (``lavin_tasks``), and
JSONL pair manifests that write ShapesWorld in a real on-disk format and read real data (``manifest``)."""

from .lavin_tasks import (TASKS, GroupedBatchSampler, InContextDataset, collate, make_pair, task_metrics,
                          visual_sentence)
from .manifest import ManifestDataset, load_media, write_manifest
from .shapes import Clip, Expression, ObjectSpec, Scene, ShapesWorld

__all__ = ["ShapesWorld", "Scene", "Clip", "ObjectSpec", "Expression", "TASKS", "InContextDataset", "make_pair",
           "collate", "GroupedBatchSampler", "visual_sentence", "task_metrics", "ManifestDataset", "load_media",
           "write_manifest"]
