#!/usr/bin/env python
"""Serve VAR + SSG over HTTP with Ray Serve, in the foreground; SIGINT/SIGTERM stop it cleanly.

  python scripts/serve.py --artifacts build/var-d16-b4 --backend onnxruntime --port 8000
  curl -s localhost:8000/v1/generate -d '{"class": 207, "seed": 0}' -o dog.png
  python scripts/serve.py --artifacts build/var-d16-b4-trt --backend tensorrt --address auto   (a Ray cluster)
"""
from var_ssg.tools.cli import script_main

script_main(__file__)
