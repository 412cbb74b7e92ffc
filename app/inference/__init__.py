"""Chat and text completions on the API, answered by the inference server (`worker/serving`)."""
