"""Real deployments: a device's own directory (device), TLS and node-key credentials
(transport), and the SuperLink / SuperNode / flwr commands (commands)."""
