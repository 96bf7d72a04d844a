"""graphs: what is exported. Plain PyTorch modules and the math they need (no export logic).

`graphs.config` imports no torch (argument parsing and the presets stay quick); the DSE
matrices live in `graphs.dse`."""
