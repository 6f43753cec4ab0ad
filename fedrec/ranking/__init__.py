"""What a ranked list is judged and explained by: ranking metrics, list diversity and MMR
re-ranking, leave-one-out explanations, on-device top-K."""
