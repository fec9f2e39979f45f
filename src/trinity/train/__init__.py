"""Training Trinity-style MoE models: Muon + AdamW, SMEBU balancing, RSDB data order, the trainer."""
