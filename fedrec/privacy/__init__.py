"""Differential privacy: sample-level DP-SGD on the device (dpsgd), the accountants and
every ε's unit (accounting), and the population study of user-level DP (population).
User-level DP-FedAvg's server side is fedrec.federation.server_opt."""
