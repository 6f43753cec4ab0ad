"""Federated runs: what a device does per message (client_round, local) and keeps
(local_store), the server side (serve, strategy, server_opt, replies, server_state,
run_store), secure aggregation (secagg), Flower's adaptations (flower), the simulation
wrapper and the Ray-free in-process engine."""
