"""Metrics over scored and generated data: each module small, pure, and fed by `overmem.scoring`.

mia          membership-inference scores (higher = more likely a member) and ROC metrics
calibration  expected calibration error, reliability bins and their figure
diversity    pass@k, best-of-n, EAD and Sentence-BERT diversity
premem       pre-memorization train accuracy (Kang et al.) and its R^2 against test accuracy

On top of them, what `overmem analyze` runs (each a library function over a model and examples):
sampling     decoding, answer checking and re-scoring of generations, shared by the runners
ood          accuracy on in-distribution and OOD sets (paper Table 2)
robustness   accuracy with the paper's neutral preambles (Table 3)
runners      diversity, calibration, MIA and pre-memorization runners
figures      ROC and metric-against-k figures
suite        the analyses over a run's checkpoints: resumable files, tables (schema in its docstring)
"""
