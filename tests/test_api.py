"""The public API without workers: validation, eager mode, settings, and the promises of the
README and of the documentation pages it links (docs/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from celery import Celery

import celery_throttled
from celery_throttled import ConfigurationError, ThrottledTask, throttled_task
from celery_throttled.settings import DEFAULTS, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
SETTINGS_PAGE = "docs/reference/settings.md"
API_PAGE = "docs/reference/api.md"
API_TABLE = "docs/_snippets/api_table.md"  # included into the API page
HOW_PAGE = "docs/reference/how-it-works.md"


@pytest.mark.parametrize("limit", [0, -1, True, False, 1.5, "5", [5]])
def test_bad_limit_raises_at_decoration_naming_task_and_value(limit):
    with pytest.raises(ConfigurationError) as info:

        @throttled_task(limit=limit, name="api.bad_limit")
        def task() -> None: ...

    assert "api.bad_limit" in str(info.value)
    assert repr(limit) in str(info.value)


@pytest.mark.parametrize("key", ["", 42, b"bytes", "x" * 2000])
def test_bad_key_raises_at_decoration(key):
    with pytest.raises(ConfigurationError, match=r"api\.bad_key"):

        @throttled_task(limit=1, key=key, name="api.bad_key")
        def task() -> None: ...


def test_conflicting_caps_on_one_key_are_refused():
    @throttled_task(limit=3, key="api-conflict", name="api.first")
    def first() -> None: ...

    with pytest.raises(ConfigurationError, match=r"already capped at 3 by task 'api.first'"):

        @throttled_task(limit=4, key="api-conflict", name="api.second")
        def second() -> None: ...


def test_positional_option_is_refused_with_a_hint():
    with pytest.raises(ConfigurationError, match="as keywords"):
        throttled_task(5)  # type: ignore[call-overload]


def test_options_pass_through_to_shared_task():
    app = Celery("passthrough", set_as_current=False)

    @throttled_task(
        limit=2,
        name="api.passthrough",
        bind=True,
        acks_late=True,
        queue="q1",
        max_retries=7,
        autoretry_for=(KeyError,),
    )
    def task(self) -> str:
        return str(self.name)

    bound = app.tasks["api.passthrough"]
    assert isinstance(bound, ThrottledTask)
    assert bound.acks_late is True
    assert bound.queue == "q1"
    assert bound.max_retries == 7
    assert bound.autoretry_for == (KeyError,)
    assert bound.throttle_limit == 2
    assert bound.throttle_key_for((), {}) == "api.passthrough"


def test_eager_mode_runs_inline():
    app = Celery("eager", set_as_current=False)
    app.conf.task_always_eager = True

    @throttled_task(limit=1, key=lambda n: f"n:{n}", name="api.eager")
    def double(n: int) -> int:
        return n * 2

    with app:  # make it the current app for the shared task proxy
        envelope = app.tasks["api.eager"].delay(21).get(timeout=1)
    assert envelope.ok and envelope.value == 42 and envelope.unwrap() == 42
    assert envelope.started_at is not None and envelope.runtime is not None


def test_settings_default_to_the_redis_broker_and_validate():
    app = Celery("s", broker="redis://h:1/2", backend="rpc://", set_as_current=False)
    settings = Settings.from_app(app)
    assert settings.redis_url == "redis://h:1/2"
    assert settings.max_hold == pytest.approx(25 * 60)
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    assert Settings.from_app(app).max_hold == pytest.approx(48)


def test_settings_refuse_a_non_redis_setup_saying_what_to_set():
    app = Celery("s", broker="amqp://guest@localhost//", backend="rpc://", set_as_current=False)
    with pytest.raises(ConfigurationError, match="throttle_redis_url"):
        Settings.from_app(app)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("throttle_lease_ttl", 0),
        ("throttle_lease_ttl", "30"),
        ("throttle_max_held", -1),
        ("throttle_key_prefix", ""),
        ("throttle_max_hold", -5),
        ("throttle_redis_url", "http://x"),
    ],
)
def test_bad_settings_name_the_setting_and_value(name, value):
    app = Celery("s", broker="redis://h:1/0", set_as_current=False)
    app.conf[name] = value
    with pytest.raises(ConfigurationError) as info:
        Settings.from_app(app)
    assert name in str(info.value)
    assert repr(value) in str(info.value)


def test_django_style_namespaced_settings_are_read():
    class DjangoSettings:
        CELERY_BROKER_URL = "redis://broker:6379/0"
        CELERY_THROTTLE_LEASE_TTL = 12
        CELERY_THROTTLE_KEY_PREFIX = "django"

    app = Celery("dj", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    settings = Settings.from_app(app)
    assert settings.lease_ttl == 12
    assert settings.key_prefix == "django"
    assert settings.redis_url == "redis://broker:6379/0"


def test_the_readme_links_the_reference_pages():
    """Given the README, when its links are read, then it links the settings, API and How it
    works pages that the tests below hold to the code (and they exist), and the API page
    includes the table: a reference that moved or that the README stopped linking fails here."""
    for page in (SETTINGS_PAGE, API_PAGE, HOW_PAGE):
        assert f"]({page})" in README, page
        assert (ROOT / page).is_file(), page
    assert "_snippets/api_table.md" in (ROOT / API_PAGE).read_text()


def test_every_setting_is_documented_in_the_settings_page():
    table = (ROOT / SETTINGS_PAGE).read_text()
    for name in DEFAULTS:
        assert f"| `{name}` |" in table, name


def test_public_api_matches_the_api_page():
    documented = set(re.findall(r"^\| `(\w+)", (ROOT / API_TABLE).read_text(), re.MULTILINE))
    assert documented == set(celery_throttled.__all__)


def test_the_docs_describe_every_module_and_the_enforced_layers():
    """Given the package's modules and the layers lint-imports enforces (pyproject.toml),
    When the "How it works" page is read,
    Then its table names every module and its layers are those: a module added or moved, or a
    layer changed, without the page following, fails here."""
    how = (ROOT / HOW_PAGE).read_text()
    package = Path(celery_throttled.__file__).parent
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).as_posix()
        if module.endswith("/__init__.py"):
            module = module.removesuffix("__init__.py")  # a subpackage has a row of its own
        assert f"`{module}`" in how, module
    pyproject = (ROOT / "pyproject.toml").read_text()
    layers = re.findall(r'"([^"]+)"', pyproject.split("layers = [", 1)[1].split("]", 1)[0])
    drawn = " ".join(how.split("lint-imports", 1)[1].split("```", 2)[1].split())
    assert drawn == " > ".join(layers)


def test_no_module_of_the_package_is_over_300_lines():
    """Given every Python module and Lua script of the package, Then none is over 300 lines:
    a module that grows back into one that does everything (the gate once had 623 lines, and
    built its transport, ran the sweeps and cancelled errgroups) fails here, to be split by
    what it owns."""
    package = Path(celery_throttled.__file__).parent
    sizes = {
        path.relative_to(package).as_posix(): len(path.read_text().splitlines())
        for pattern in ("*.py", "*.lua")
        for path in package.rglob(pattern)
    }
    assert {module: n for module, n in sizes.items() if n > 300} == {}


def test_ci_runs_the_readme_test_command_verbatim():
    first_lines = [line.strip() for line in README.splitlines()[:2]]
    assert all(line.startswith("python3 -m venv .venv && ") for line in first_lines)
    assert first_lines[1] in (ROOT / ".ci" / "run").read_text().splitlines()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"soft_timeout": 0}, "soft_timeout must be a positive number of seconds, got 0"),
        ({"hard_timeout": -1}, "hard_timeout must be a positive number of seconds, got -1"),
        ({"soft_timeout": "5"}, "soft_timeout must be a positive number of seconds, got '5'"),
        ({"soft_time_limit": -2}, "soft_time_limit must be a positive number"),
        ({"soft_timeout": 5, "hard_timeout": 5}, r"soft_timeout \(5.0\) must be shorter"),
        ({"soft_timeout": 9, "hard_timeout": 3}, r"soft_timeout \(9.0\) must be shorter"),
    ],
)
def test_bad_timeouts_raise_at_decoration_naming_the_task(options, message):
    with pytest.raises(ConfigurationError, match=message) as info:

        @throttled_task(limit=1, name="api.timeouts", **options)
        def task() -> None: ...

    assert "api.timeouts" in str(info.value)


def test_timeouts_map_onto_celerys_time_limits():
    app = Celery("timeouts", set_as_current=False)

    @throttled_task(limit=1, name="api.timed", soft_timeout=2, hard_timeout=3)
    def timed() -> None: ...

    assert (app.tasks["api.timed"].soft_time_limit, app.tasks["api.timed"].time_limit) == (2, 3)


def test_bad_deadline_is_refused_naming_the_task():
    app = Celery("deadline", set_as_current=False)

    @throttled_task(limit=1, name="api.deadline")
    def task() -> None: ...

    with pytest.raises(ConfigurationError, match=r"api.deadline.*got -3"):
        app.tasks["api.deadline"].apply_async(deadline=-3)


def test_key_function_gets_the_tasks_arguments():
    app = Celery("keys", set_as_current=False)

    @throttled_task(limit=1, key=lambda tenant_id, **kw: f"tenant:{tenant_id}", name="api.tenant")
    def sync(tenant_id: str, full: bool = False) -> None: ...

    task = app.tasks["api.tenant"]
    assert task.throttle_key_for(("acme",), {"full": True}) == "tenant:acme"
    assert task.throttle_key_for((), {"tenant_id": "globex"}) == "tenant:globex"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_wait": 0}, "max_wait must be a positive number of seconds, got 0"),
        ({"on_full": "drop"}, "on_full must be one of"),
        ({"fallback": "cached"}, "fallback must be callable"),
        ({"retry": 3}, "retry must be a RetryPolicy, got 3"),
    ],
)
def test_bad_policies_raise_at_decoration(options, message):
    with pytest.raises(ConfigurationError, match=message) as info:

        @throttled_task(limit=1, name="api.policies", **options)
        def task() -> None: ...

    assert "api.policies" in str(info.value)


def test_retry_policy_maps_onto_celery_autoretry():
    from celery_throttled.policies import RetryPolicy

    app = Celery("retry", set_as_current=False)

    @throttled_task(limit=1, name="api.retry", retry=RetryPolicy(4, on=(OSError,), backoff=2))
    def task() -> None: ...

    bound = app.tasks["api.retry"]
    # the countdown is the policy's own (ThrottledTask.retry), not Celery's whole-second backoff
    assert (bound.autoretry_for, bound.max_retries, bound.retry_backoff) == ((OSError,), 3, False)
    assert bound.throttle_retry == RetryPolicy(4, on=(OSError,), backoff=2)
    with pytest.raises(ConfigurationError, match="max_attempts must be an int >= 1, got 0"):
        RetryPolicy(0).celery_options("api.retry")
