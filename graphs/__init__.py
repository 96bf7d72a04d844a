"""graphs: what is exported. Plain PyTorch modules and the math they need (no export logic).

`graphs.config` imports no torch (argument parsing and the presets stay quick); the DSE
matrices live in `graphs.dse`."""


def __getattr__(name):
    """`from var_ssg.graphs import dse_matrix` (its public name, DESIGN.md "Packaging"), imported
    on first use so that `import var_ssg.graphs.config` stays free of numpy and torch."""
    if name == "dse_matrix":
        from .dse import dse_matrix
        return dse_matrix
    raise AttributeError(f"module 'var_ssg.graphs' has no attribute {name!r}")
