"""``determined.tensorboard.metric_writers``: see `pytorch`."""
