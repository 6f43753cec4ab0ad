"""Real deployments: TLS and node-key credentials (transport) and the SuperLink /
SuperNode / flwr commands (commands); a device's own directory is read by
fedrec.data.device."""
