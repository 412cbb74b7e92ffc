"""`python -m worker.serving [--host H] [--port P]`: run the inference server."""

import argparse

from worker.serving.app import run_server

parser = argparse.ArgumentParser(prog="python -m worker.serving", description="Tuneforge inference server")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8001)
args = parser.parse_args()
run_server(args.host, args.port)
