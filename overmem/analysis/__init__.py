"""The analyses of `overmem analyze`: one module each, owning its settings, metrics and runner.

base         the contract (`Analysis`, `register`, `Context`) and the registry `ANALYSES`
sampling     decoding, answer checking and re-scoring of generations, shared by the analyses
ood          accuracy on in-distribution and OOD sets (paper Table 2)
robustness   accuracy with the paper's neutral preambles (Table 3)
diversity    pass@k, best-of-n, EAD and Sentence-BERT diversity (Fig. 5, Table 8)
calibration  expected calibration error, reliability bins and their figure (App. D.1)
mia          membership-inference scores and ROC metrics (App. D.2, Table 7)
premem       pre-memorization train accuracy (Kang et al.) and its R^2 against test accuracy
judge        win rate against reference outputs by an LLM judge endpoint (off by default)
figures      ROC and metric-against-k figures
suite        the analyses over a run's checkpoints: resumable files, tables (schema in its docstring)

Importing the package registers every analysis, in the order below: the order of the default
suite, of the run config's `analysis` sections and of the printed tables.

Every `RunConfig` imports this package (its `analysis` section is built from the registered
settings), and loading settings must not load torch (seconds): `overmem select`, `plot` and
`report` do without it. Hence importing the package imports neither torch nor transformers:
their types are imported under `if TYPE_CHECKING:`, and torch, matplotlib and the modules that
run a model (`overmem.scoring`, `generation`, `dynamics`) are imported inside the functions that
use them. `suite`, which loads the models, is imported only by `overmem analyze`.
"""

from . import ood, robustness, diversity, calibration, mia, premem, judge  # noqa: F401, I001  (registration order)
