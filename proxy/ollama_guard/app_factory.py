"""Entry point for multi-worker uvicorn: each worker builds the app from the environment."""

from __future__ import annotations

from fastapi import FastAPI

from . import logs
from .app import create_app
from .settings import load_settings


def app() -> FastAPI:
    settings = load_settings()
    logs.configure(settings.logging.level, settings.logging.json_format)
    return create_app(settings)
