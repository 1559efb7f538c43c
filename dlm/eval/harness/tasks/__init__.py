"""lm-eval task YAMLs of dlm's offline tasks (dlm_ppl, dlm_cloze, dlm_continuation, dlm_sudoku; group dlm_text) and
`utils.py`, the functions they name (`!function utils.NAME`). Data: dlm.eval.harness.data."""
