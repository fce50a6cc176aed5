"""QuantPlan service: the command-line interface (and later the HTTP API and job runner)."""
