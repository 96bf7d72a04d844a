"""Benchmarks, as a library (the CLI in tools/commands prints what these return):
bench.py      side-by-side backend timings per batch size, SSG's isolated cost, DSE three ways
ssg_graph.py  the SSG prior + fusion of one scale as a small ONNX graph (its cost on ONNX Runtime)
roofline.py   the speed floor of a batch and the one choice of peaks (given or a GPU's data sheet)
gpu_plan.py   the GPU check's plan: rows in order, stages and estimates, skip reasons (pure)
gpu_check.py  the GPU check itself: runs the plan inside its budget, one result per row
"""
