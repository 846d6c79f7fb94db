"""The HTTP service: a loaded index folder answering a shop's website, many visitors at once.

``python -m fashionrec serve --index-dir OUTDIR`` (uvicorn, or Ray Serve with ``--engine ray``);
:func:`fashionrec.service.app.create_app` builds the FastAPI application both run.
"""
