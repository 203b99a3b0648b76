"""A minimal Django project using celery-throttled the way Django projects use Celery."""

from .celery import app as celery_app

__all__ = ["celery_app"]
