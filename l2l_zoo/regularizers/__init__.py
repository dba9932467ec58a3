"""Regularizers that apply to any LearnedOptimizer, and measurements of what they regularize."""
from .smoothness import (STARTS, PerturbedInput, SmoothnessConfig, SmoothnessRegularizer, input_noise_seed,
                         measure_smoothness, parse_smooth, response_curve)

__all__ = ["SmoothnessConfig", "SmoothnessRegularizer", "parse_smooth", "PerturbedInput", "measure_smoothness",
           "response_curve", "input_noise_seed", "STARTS"]
