"""Data: dataset readers and download, the evaluation protocol (the split, what a device
holds of it) and how every method is judged, a real device's own directory, the frozen PLM
item encoder, and the pipeline that prepares it all once per process."""
