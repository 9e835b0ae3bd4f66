"""tuna_train: data, packing, models, the training loop and the `tuna` CLI."""
