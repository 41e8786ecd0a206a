"""The HTTP service: a thin FastAPI layer over the engine (``seq2serve.engine``).

``create_app(settings)`` in ``app`` builds the app (also usable as an ASGI factory:
``uvicorn --factory seq2serve.service.app:create_app``); ``serve(settings)`` in ``server``
runs it under uvicorn with a graceful SIGTERM drain. Nothing here imports PyTorch unless the
torch runtime is asked for.
"""
