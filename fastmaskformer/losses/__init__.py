"""Matching and losses (DESIGN 3)."""
from .criterion import SetCriterion, build_criterion, count_masks
from .matcher import FixedMatcher, HungarianMatcher, build_matcher

__all__ = ["SetCriterion", "build_criterion", "count_masks", "FixedMatcher", "HungarianMatcher", "build_matcher"]
