"""Self-supervised methods. Front door: `mrl.ssl.methods.METHODS` (a method is a loss in losses and one record in
methods); the model train_ssl.py trains (model), its projector and predictor (projectors) and EMA target (ema)."""
