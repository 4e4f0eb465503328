"""Analyses of trained HPM models (sensitivity of the FC head vs the l2 head)."""
from .figures import plot_sensitivity
from .sensitivity import (ANALYSIS_HEADS, apgd_accuracy, feature_sensitivity, flip_distance, format_summary,
                          head_logit_fn, logit_margin, margin_gradient, pre_logit_features, robust_accuracy_curve,
                          summarize)
