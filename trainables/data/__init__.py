"""ECG data: lead names, preprocessing, WFDB record reading and the cached PTB-XL arrays.

Modules: `leads` (the 12 standard lead names), `preprocess` (resampling and high-pass),
`records` (one WFDB record, as `leadtune label` reads it), `ptbxl` (the PTB-XL tables),
`cache` (`prepare_dataset`: read once, keep a memory-mapped cache) and `commands`
(the `leadtune data` CLI). Kept import-free so that the CLI starts fast.
"""
