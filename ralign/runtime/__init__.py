"""The torch side of ralign: models, sampling, ranking and training."""
