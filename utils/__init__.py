"""Helper package for the Distill & Deploy course.

Small modules named by topic (``utils.distill``, ``utils.quantize``, ...). Importing any of
them does no work: no seeding, no downloads, no prints. Notebooks import what they use
explicitly, e.g. ``from utils.distill import kd_loss``.
"""

__version__ = "0.1.0"
