"""`fluxion serve`: FLUX.2 as a service speaking BFL's API and OpenAI's Images API (extra `[serve]`).

app.py (routes), schemas.py (bodies), inputs.py (untrusted fields -> images and sizes), store.py (jobs, leases,
accounting), engine.py (the worker and its batches), webhooks.py, auth.py (keys, prices), moderation.py,
config.py, cli.py (`fluxion serve`, `fluxion keys`). Imports the library, never train/ or curate/.
"""
