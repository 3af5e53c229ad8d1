"""GCG evaluation (``grand glamm eval-gcg``): AP50, mIoU, phrase/mask recall and caption metrics.

``io`` reads predictions, ``gt`` the ground truth, ``metrics`` holds the mask and caption kernels,
``recall`` the phrase/mask recall definitions, ``embed`` the phrase embedders, and ``gcg``
ties them into one report dict.
"""

from grand_pipeline.training.eval.gcg import EvalOptions, evaluate_gcg, run_eval_gcg
from grand_pipeline.training.eval.io import EvalInputError

__all__ = ["EvalInputError", "EvalOptions", "evaluate_gcg", "run_eval_gcg"]
