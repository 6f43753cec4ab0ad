"""Models: the protocol every model answers (protocol), the sequence model (seqrec),
FedMF (fedmf) and the private recommender's trainable form (profile), built from the
config (build); one training epoch and optimizer (train),
the centralized reference (central), the public warm start, saved models (saved) and the
non-learned baselines."""
