"""Results to look at: the interactive viewer, a self-contained HTML report, figures, Neuronpedia export."""

from adag.report.export import neuronpedia_graph, write_neuronpedia
from adag.report.html import ReportConfig, make_server, serve_in_background, write_report

__all__ = ["ReportConfig", "make_server", "neuronpedia_graph", "serve_in_background", "write_neuronpedia",
           "write_report"]
