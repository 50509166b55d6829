"""BraTS 2017 data: find cases on disk (layout), read and check NIfTI (nifti), map labels to
training targets and back (labels), build and read the preprocessing cache (prepare, cache),
draw editable train/validation splits (splits), serve crops and whole cases to torch (dataset),
and make synthetic BraTS-like cases (phantom, synthetic). Metrics, evaluation and inference live in
metrics, evaluate and inference.
"""
