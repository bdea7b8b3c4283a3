"""Unpair-Seg training entry points: ``python -m train.unpair_seg --stage {1,2} --config ...`` (``stage1``: promptable
mask generation on SA-1B-format data, ``stage2``: mask-entity alignment; ``common``: the YAML config helpers both
share)."""
