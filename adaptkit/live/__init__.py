"""Live torch modules: injection of adapters into any ``nn.Module``, the wrapper layers, and status tables."""
