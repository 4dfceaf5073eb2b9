"""The names of the evaluation metrics, defined once: evaluation computes them, settings check
``--metric_for_best`` against them, the report and the console print them. Imports nothing."""

# Every score eval.compute_metrics returns where higher is better; with the loss, what --metric_for_best may pick.
SCORE_METRICS = ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "f1_macro", "f1_micro", "f1_weighted")
REPORT_METRICS = (*SCORE_METRICS, "loss")
# The same for eval.multi_label_metrics.
MULTI_LABEL_METRICS = ("f1_micro", "f1_macro", "f1_samples", "precision_micro", "recall_micro", "subset_accuracy",
                       "hamming_loss", "loss")
# For these lower is better; for every other metric, higher.
LOWER_IS_BETTER = ("loss", "hamming_loss")

# What the console's before/after table shows, and what the training-curves plot draws.
SUMMARY_METRICS = ("accuracy", "f1", "precision", "recall", "balanced_accuracy", "loss")
MULTI_LABEL_SUMMARY = ("f1_micro", "f1_macro", "f1_samples", "subset_accuracy", "hamming_loss", "loss")
CURVE_METRICS = {False: ("accuracy", "balanced_accuracy", "f1"), True: ("f1_micro", "f1_macro", "subset_accuracy")}
