"""Differential privacy: sample-level DP-SGD (v1 models: dpsgd, pooled_norms; the sequence
model: seq_dpsgd), user-level DP-FedAvg (user_dp), the accountants and every ε's unit
(accounting), the privacy-budget sweep and the membership-inference audit."""
