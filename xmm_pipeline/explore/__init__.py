"""`xmm-pipeline explore`: the latent map in a web browser (data.py: what is shown; selection.py: the
export; app.py: the Starlette app; static/: the page). At the floor of the CLI: nothing imports it."""
