"""Training data: the ShapesWorld generator (``shapes``), LaVin-DiT in-context tasks on it (``lavin_tasks``), and
JSONL pair manifests that write ShapesWorld in a real on-disk format and read real data (``manifest``); CRIS
referring-expression data: the RefCOCO/+/g refer-format loader (``refer``) and ShapesWorld expressions (``cris_data``)."""

from .lavin_tasks import (TASKS, GroupedBatchSampler, InContextDataset, collate, make_pair, task_metrics,
                          visual_sentence)
from .manifest import ManifestDataset, load_media, write_manifest
from .shapes import Clip, Expression, ObjectSpec, Scene, ShapesWorld
from .refer import Refer, ReferDataset, UnsafePickleError, load_pickle
from .refer import collate as refer_collate
from .cris_data import ShapesReferDataset, write_refer

__all__ = ["ShapesWorld", "Scene", "Clip", "ObjectSpec", "Expression", "TASKS", "InContextDataset", "make_pair",
           "collate", "GroupedBatchSampler", "visual_sentence", "task_metrics", "ManifestDataset", "load_media",
           "write_manifest", "Refer", "ReferDataset", "UnsafePickleError", "load_pickle", "refer_collate",
           "ShapesReferDataset", "write_refer"]
