"""POST /v1/fine_tuning/estimate: parameter counts, memory and time per method, before anything runs."""
