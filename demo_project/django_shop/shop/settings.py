"""Settings of the demo's Django project; celery-throttled reads ``CELERY_THROTTLE_*``."""

import os

SECRET_KEY = "demo-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["orders"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("SHOP_QUEUE", "shop")
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# celery-throttled's settings, under Celery's namespace like every other Celery setting
CELERY_THROTTLE_KEY_PREFIX = os.environ.get("SHOP_PREFIX", "shop")
CELERY_THROTTLE_LEASE_TTL = 10
