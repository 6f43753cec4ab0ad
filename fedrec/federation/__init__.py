"""Federated runs: what a device does per message (client_round, local) and keeps
(local_store), the server side (serve, strategy, replies, server_state, run_store), secure
aggregation (secagg), the simulation wrapper and the Ray-free in-process engine."""
