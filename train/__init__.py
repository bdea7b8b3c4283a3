"""Training (run from a checkout): the shared DeepSpeed trainer (``train/trainer.py``), data (``train/data/``, with
the synthetic ShapesWorld generator), configs, and one entry point per model (``python -m train.<model>``).
They arrive with the LaVin-DiT end-to-end issue (design.md §7, roadmap step 4)."""
