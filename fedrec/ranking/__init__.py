"""What a ranked list is re-ranked and explained by: MMR and DPP re-ranking (diversity),
leave-one-out explanations (explain), on-device top-K (recommend)."""
