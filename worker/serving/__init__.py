"""The built-in inference server: resident base models, LoRA adapters on demand, mixed-adapter batches.

`engine` and `decode` generate without knowing HTTP; `batcher` gathers concurrent requests into batches;
`resolve` turns a model id into the folders to load; `app` is the internal HTTP server the API forwards to.
"""
