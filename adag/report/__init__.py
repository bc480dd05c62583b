"""Results to look at: the interactive viewer, a self-contained HTML report, figures, Neuronpedia export."""

import lazy_loader

# Lazy: the CLI imports report.config at start-up without reading any run.
__getattr__, __dir__, __all__ = lazy_loader.attach(__name__, submod_attrs={
    "export": ["neuronpedia_graph", "write_neuronpedia"],
    "figure": ["write_figure"],
    "html": ["make_server", "serve_in_background", "write_report"],
})
