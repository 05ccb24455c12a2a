"""The OpenAI-compatible HTTP server (``memattn serve``): protocol (request models, errors), one engine loop
shared by all requests, the FastAPI app. Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client,
jinja2). The import graph points one way: serve -> engine."""
from .app import build_app, serve
from .engine_loop import EngineLoop, Submission
from .metrics import ServerMetrics, parse_metrics
from .protocol import APIError

__all__ = ["build_app", "serve", "EngineLoop", "Submission", "ServerMetrics", "parse_metrics", "APIError"]
