"""Metrics over scored and generated data: each module small, pure, and fed by `overmem.scoring`.

mia          membership-inference scores (higher = more likely a member) and ROC metrics
calibration  expected calibration error, reliability bins and their figure
diversity    pass@k, best-of-n, EAD and Sentence-BERT diversity
premem       pre-memorization train accuracy (Kang et al.) and its R^2 against test accuracy
"""
