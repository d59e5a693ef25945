"""Matching and losses (DESIGN 3): MaskFormer's full-resolution criterion and Mask2Former's
point-sampled one share the class loss, the solve and deep supervision."""
from .criterion import PointSampledCriterion, SetCriterion, build_criterion, count_masks
from .matcher import FixedMatcher, HungarianMatcher, PointMatcher, build_matcher

__all__ = ["PointSampledCriterion", "SetCriterion", "build_criterion", "count_masks", "FixedMatcher",
           "HungarianMatcher", "PointMatcher", "build_matcher"]
