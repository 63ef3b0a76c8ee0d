"""Applications: what orchestrates several layers for a user (train, evaluate, report).

``demo`` (the synthetic occluded comparison of Baseline, MHSA-Net and HA-CNN) and ``compare``
(a paired statistical comparison of two evaluated runs or feature files). They sit above
``engine``, ``evaluation`` and ``viz`` and beside the CLI, which is a thin shell over them;
nothing below imports them.
"""
