"""Models built on mmkernels ops (run from a checkout, not installed): ``models.lavin_dit``, ``models.cris``,
``models.unpair_seg``. Shared pieces live in ``models.common``."""
