"""Bridges to other libraries' models: read their settings as fdet specs, convert their weights.

- :mod:`fdet.compat.torchvision`: torchvision's RetinaNet (``retinanet_resnet50_fpn`` and its
  ``_v2``) as an fdet spec, state dict and detector.
"""
