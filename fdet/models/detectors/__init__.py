"""Whole detectors composed from backbone, neck and head modules."""

from fdet.models.detectors.single_stage import SingleStageDetector

__all__ = ["SingleStageDetector"]
