"""Models: the v2 sequence model (SeqRec), the v1 text model and FedMF (build_model for
every kind), central training and the non-learned baselines."""
