"""The demo's Celery app: ``celery -A demo worker`` from ``demo_project/``."""

from .celery import app

__all__ = ["app"]
