"""Training: the run config, data, the loss and the jitted step, the loop, `--plan`, and the demo."""
