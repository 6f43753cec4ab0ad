"""Data: dataset readers and download, the evaluation protocol (split, unreleased items,
negatives), the frozen PLM item encoder, and the pipeline that ties them together."""
