"""What a clinician or a reviewer asks of a classifier beyond one number (issue 14), as pure functions of
numpy arrays and pandas frames: a subgroup audit, melanoma and malignancy operating points, conformal
prediction sets, selective prediction and out-of-distribution flags. Nothing here reads a run folder or
a model; the commands pass in probabilities (logits for the OOD score), labels, lesion ids and metadata.
"""
