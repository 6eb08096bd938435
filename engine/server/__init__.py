"""The OpenAI-compatible HTTP server: `build_app(engine, ...)` in `engine.server.app`, the
`hal serve` command in `engine.server.cli`. Importing this package loads neither FastAPI nor
uvicorn.
"""
