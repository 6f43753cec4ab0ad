"""fedrec: privacy-preserving federated recommendation with a frozen PLM."""
