"""Differential privacy: sample-level DP-SGD on the device (dpsgd), the accountants and
every ε's unit (accounting), exact ε of one Gaussian release and of DP-FTRL's tree
(exact), DP popularity and the one-release recommender (dp_popularity), and the
population study of user-level DP (population). User-level DP-FedAvg's server side
(independent or tree noise) is fedrec.federation.server_opt."""
