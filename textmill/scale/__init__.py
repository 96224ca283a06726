"""textmill past one machine: replicas of the whole server as a Ray Serve application.

    HTTP -> Ray's proxy -> ingress (reads the body, picks a routing key) -> engine replica
         (textmill's own FastAPI app, run in-process per call) -> messages streamed back

Nothing in textmill imports this package; it imports the rest (DESIGN.md). `ray` is an
optional extra (`pip install textmill[ray]`).
"""
