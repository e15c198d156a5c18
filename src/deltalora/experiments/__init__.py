"""The research questions as a grid of cached cells: planning, running, scoring, composition and the report."""
