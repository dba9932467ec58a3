"""Regularizers that apply to any LearnedOptimizer."""
from .smoothness import SmoothnessConfig, SmoothnessRegularizer, parse_smooth

__all__ = ["SmoothnessConfig", "SmoothnessRegularizer", "parse_smooth"]
