"""LAPDOG-GRPO: retrieval-augmented personalized dialogue with GRPO."""
