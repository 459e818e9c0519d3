"""Pure-PyTorch math of the plugin: the oracle of every kernel test. Runs on CPU and GPU."""
