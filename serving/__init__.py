"""The pipeline behind HTTP (Ray Serve). requests.py: parsing and validation of a request, the
/v1/model summary and the options (no Ray import: unit-tested without a server); proxy.py: the
body bound the HTTP proxy enforces; app.py: the deployments; launch.py: preflight, Ray up,
the application up, a graceful stop; loadgen.py: the closed-loop load generator of
bench_serve. DESIGN.md "Serving: bounded, bound, stoppable" describes the whole."""
