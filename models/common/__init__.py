"""Pieces shared by the models: checkpoint loading (strict and safe)."""

from models.common.checkpoint import load_into, read_state_dict, strip_prefixes

__all__ = ["load_into", "read_state_dict", "strip_prefixes"]
