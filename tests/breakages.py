"""The breakage drill: deliberate breakages of the core, each applied alone to a scratch copy of
the repository, and the tests that must catch it.

    .venv/bin/python tests/breakages.py [--only NAME[,NAME...]] [--list] [--check] [--json PATH]

For each breakage the drill applies one exact edit (a file, the text to find, its replacement)
to the copy, runs the tests named for it (``pytest -x``), records whether they failed (caught)
or passed (survived), and undoes the edit. The text must be found exactly once, and every
named test must exist, or the drill stops at once: it cannot rot silently as the code moves.
The copy runs its own code (checked before the first breakage), workers included, and is
removed at the end. Prints a table and exits 1 if any breakage survived.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "plugin/celery_throttled"


@dataclass(frozen=True)
class Breakage:
    name: str
    #: the file, relative to the repository root
    file: str
    #: the exact text to replace, found exactly once
    old: str
    new: str
    #: pytest node ids that must fail while the breakage is in place
    tests: tuple[str, ...]


GATE = "tests/test_promises_gate.py::"
TIMEOUTS = "tests/test_promises_timeouts.py::"
OUTCOMES = "tests/test_promises_outcomes.py::"
ERRGROUP = "tests/test_promises_errgroup.py::"
ADMISSION = "tests/test_admission.py::"
BACKPRESSURE = "tests/test_backpressure.py::"
ADAPTIVE = "tests/test_adaptive.py::"
PARKING = "tests/test_parking.py::"

BREAKAGES = [
    Breakage(
        "a release that does not grant",
        f"{PACKAGE}/lua/release.lua",
        "local now, _, _, mine, reaped, wake = grant(ARGV[1], ARGV[3], tonumber(ARGV[4]), "
        "ARGV[5], ARGV[6],\n  ending and worker or nil, ending)",
        "local now, mine, reaped, wake = now_ms(), {}, {}, 0",
        ("tests/test_leases.py::test_grants_up_to_the_cap_then_queues_in_order",),
    ),
    Breakage(
        "a grant that ignores the cap",
        f"{PACKAGE}/lua/grant.lua",
        "lucky, wake = flow_next(cap - running, now)",
        "lucky, wake = flow_next(cap + 1 - running, now)",
        ("tests/test_leases.py::test_grants_up_to_the_cap_then_queues_in_order",),
    ),
    Breakage(
        "grants to the newest waiter first",
        f"{PACKAGE}/lua/admission.lua",
        "if not interval then return redis.call('ZRANGE', KEYS[2], 0, n - 1), nil end",
        "if not interval then return redis.call('ZRANGE', KEYS[2], 0, n - 1, 'REV'), nil end",
        (f"{GATE}test_the_oldest_waiter_in_the_cluster_is_served_first",),
    ),
    Breakage(
        "a renewal that does not extend running leases",
        f"{PACKAGE}/lua/renew.lua",
        "  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])\n",
        "",
        (f"{GATE}test_a_run_longer_than_its_lease_keeps_its_slot[eventloop]",),
    ),
    Breakage(
        "an event-loop transport that skips renewals",
        f"{PACKAGE}/transport/eventloop.py",
        "        for op in round_.renewals:\n            self._write(op)",
        "        for op in round_.renewals:\n            pass",
        (f"{GATE}test_a_run_longer_than_its_lease_keeps_its_slot[eventloop]",),
    ),
    Breakage(
        "a threaded transport that skips renewals",
        f"{PACKAGE}/transport/threads.py",
        "                ops += batch.round.renewals + batch.round.reaping(replies[-1])",
        "                ops += batch.round.reaping(replies[-1])",
        (f"{GATE}test_a_run_longer_than_its_lease_keeps_its_slot[threads]",),
    ),
    Breakage(
        "no grace for acquires after a restart",
        f"{PACKAGE}/transport/base.py",
        "                self._acquire_after = time.monotonic() + self.grace\n",
        "",
        (f"{GATE}test_after_an_outage_no_new_task_is_admitted_before_running_leases_are_back",),
    ),
    Breakage(
        "a renewal that grants waiters during the grace",
        f"{PACKAGE}/transport/base.py",
        "            renewals = [replace(op, waiting=()) for op in renewals]\n",
        "            pass\n",
        (f"{GATE}test_after_an_outage_waiters_are_not_granted_before_running_leases_are_back",),
    ),
    Breakage(
        "an end path that forgets to release",
        f"{PACKAGE}/worker/endpaths.py",
        '            release("retried" if isinstance(exc, Retry) else "failed", came_back)',
        "            pass",
        ("tests/test_cap.py::test_killed_child_frees_its_slot_at_once",),
    ),
    Breakage(
        "a slot freed only when the worker hears of the end",
        f"{PACKAGE}/pool/execution.py",
        "            release.free(task, request, outcome)",
        "            pass",
        (
            "tests/test_cap.py::"
            "test_the_slot_is_free_as_the_body_ends_not_when_the_worker_hears_of_it[prefork]",
        ),
    ),
    Breakage(
        "every slot's release left to the worker, a binding cap's too",
        f"{PACKAGE}/worker/gate.py",
        "            held.deferred = held.far_from_binding(room)\n",
        "            held.deferred = True\n",
        (
            "tests/test_cap.py::"
            "test_the_slot_is_free_as_the_body_ends_not_when_the_worker_hears_of_it[prefork]",
        ),
    ),
    Breakage(
        "a pool process that releases a slot of a cap far from binding",
        f"{PACKAGE}/pool/release.py",
        'if not leases or info.get("deferred") or ',
        "if not leases or ",
        (
            "tests/test_cap.py::test_a_cap_far_from_binding_costs_one_script_call_and_frees_"
            "its_slots_without_the_round[prefork]",
        ),
    ),
    Breakage(
        "a slot of a family left to the worker, the key's own room taken for the family's",
        f"{PACKAGE}/worker/lines.py",
        "return rules.family is None and rules.adaptive is None",
        "return rules.adaptive is None",
        ("tests/test_fair.py::test_a_freed_slot_of_a_family_goes_to_another_key_as_the_body_ends",),
    ),
    Breakage(
        "an adaptive run's report naming a key outside its key's slot",
        f"{PACKAGE}/pool/feedback.py",
        "keys = [family.holders, family.waiters, family.meta, family.bodies]",
        'keys = [family.holders, family.waiters, family.meta, "bodies"]',
        (f"{ADAPTIVE}test_an_adaptive_cap_holds_on_a_redis_cluster",),
    ),
    Breakage(
        "a deferred release kept for the renewal round",
        f"{PACKAGE}/worker/gate.py",
        "within=LINGER if held.deferred else None",
        "within=None",
        (
            "tests/test_cap.py::test_a_cap_far_from_binding_costs_one_script_call_and_frees_"
            "its_slots_without_the_round[threads]",
        ),
    ),
    Breakage(
        "a renewal that revives a slot freed as its body ended",
        f"{PACKAGE}/lua/renew.lua",
        "  if not (ended and redis.call('ZSCORE', KEYS[6], ARGV[i])) then",
        "  if true then",
        (
            "tests/test_leases.py::"
            "test_a_release_as_the_body_ends_frees_once_and_no_renewal_brings_it_back",
        ),
    ),
    Breakage(
        "a watchdog that never fires on threads",
        f"{PACKAGE}/pool/timeouts.py",
        "    ctypes.pythonapi.PyThreadState_SetAsyncExc(\n"
        "        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)\n    )",
        "    return",
        (f"{TIMEOUTS}test_a_thread_blocked_in_a_c_call_sees_the_soft_timeout_when_it_returns",),
    ),
    Breakage(
        "no SIGALRM for solo",
        f"{PACKAGE}/pool/timeouts.py",
        "            signal.setitimer(signal.ITIMER_REAL, max(soft, 0.001))",
        "            pass",
        ("tests/test_timeouts.py::test_soft_timeout_raises_inside_the_task[solo]",),
    ),
    Breakage(
        "a hard timeout not reported on threads",
        f"{PACKAGE}/pool/execution.py",
        "timer = watchdog.arm(soft, hard, _hard_reporter(task, request, details, hard))",
        "timer = watchdog.arm(soft, hard, None)",
        (
            f"{TIMEOUTS}test_the_caller_gets_its_envelope_at_the_hard_limit_while_the_call_blocks"
            "[threads-sleep]",
        ),
    ),
    Breakage(
        "timeouts declared on the decorator ignored",
        f"{PACKAGE}/pool/execution.py",
        "    soft = soft or task.soft_time_limit\n    hard = hard or task.time_limit\n",
        "",
        (f"{TIMEOUTS}test_timeouts_declared_on_the_decorator_are_enforced[threads]",),
    ),
    Breakage(
        "a fallback applied after a hard timeout",
        f"{PACKAGE}/pool/execution.py",
        "        if timer is not None and timer.hard_fired:\n"
        "            raise Ignore() from None  # the caller already has its hard_timeout "
        "envelope\n",
        "",
        (f"{OUTCOMES}test_hard_timeouts_and_lost_workers_are_not_degraded",),
    ),
    Breakage(
        "a deadline ignored while queued",
        f"{PACKAGE}/worker/gate.py",
        "        if deadlines.passed(req):\n            outcomes.deadline_passed(",
        "        if False:\n            outcomes.deadline_passed(",
        ("tests/test_timeouts.py::test_deadline_passed_while_queued_never_runs",),
    ),
    Breakage(
        "a message held past throttle_max_hold",
        f"{PACKAGE}/worker/sweep.py",
        "    if waited > max_hold:",
        "    if False:",
        ("tests/test_resilience.py::test_messages_held_past_max_hold_go_back_and_run_once",),
    ),
    Breakage(
        "a granted request left at the back of the pool queue",
        f"{PACKAGE}/worker/gate.py",
        "        poolqueue.jump(self.consumer, req)\n",
        "",
        (f"{GATE}test_a_granted_request_goes_to_the_front_of_the_pool_queue",),
    ),
    Breakage(
        "widening past throttle_max_held",
        f"{PACKAGE}/worker/window.py",
        "if not held.widened and self.widened < self.limit:",
        "if not held.widened:",
        (f"{GATE}test_throttle_max_held_bounds_the_messages_a_worker_holds",),
    ),
    Breakage(
        "an errgroup member admitted without its own cap",
        f"{PACKAGE}/worker/gate.py",
        "        if held.next_cap is not None:",
        "        if False:",
        (f"{ERRGROUP}test_a_members_own_cap_applies_within_the_groups_limit",),
    ),
    Breakage(
        "a refused task left unacknowledged",
        f"{PACKAGE}/worker/outcomes.py",
        '        req.send_event("task-failed", exception=repr(exc))\n        req.acknowledge()',
        '        req.send_event("task-failed", exception=repr(exc))',
        (f"{GATE}test_a_rejected_task_is_acknowledged",),
    ),
    Breakage(
        "a reaper that reports nothing",
        f"{PACKAGE}/worker/outcomes.py",
        "def report_lost(app: Any, key: str, holders: list[str]) -> None:\n",
        "def report_lost(app: Any, key: str, holders: list[str]) -> None:\n    return\n",
        ("tests/test_envelope.py::test_whole_worker_death_is_reported_by_a_survivor[threads]",),
    ),
    Breakage(
        "an errgroup start that ignores cancellation",
        f"{PACKAGE}/errgroup/lua/eg_start.lua",
        "if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then",
        "if false then",
        (f"{ERRGROUP}test_a_member_already_handed_to_the_pool_never_starts_once_cancelled",),
    ),
    Breakage(
        "a failed task that leaves its errgroups running",
        f"{PACKAGE}/errgroup/flow.py",
        "    if not ok and protocol.info(request):\n        task_failed(app, task_id)",
        "    pass",
        (f"{ERRGROUP}test_a_child_errgroup_is_cancelled_when_the_task_that_started_it_fails",),
    ),
    Breakage(
        "a cause chain without a bound",
        f"{PACKAGE}/envelope.py",
        "_MAX_CAUSE_DEPTH = 5",
        "_MAX_CAUSE_DEPTH = 50",
        (f"{OUTCOMES}test_the_cause_is_kept_at_most_five_deep",),
    ),
    Breakage(
        "a revocation read back as an error",
        f"{PACKAGE}/results.py",
        '    kind = "revoked" if status == states.REVOKED else "error"\n'
        '    error = error_for(exc) if kind == "error" else ErrorInfo.from_exception(exc, kind)',
        '    kind = "error"\n    error = ErrorInfo.from_exception(exc, kind)',
        (f"{GATE}test_revoked_tasks_settle_as_revoked",),
    ),
    Breakage(
        "a retry counted as a failure where it ran",
        f"{PACKAGE}/pool/execution.py",
        '        outcome = "retried"\n',
        "",
        (f"{OUTCOMES}test_retries_are_counted_as_retried[threads]",),
    ),
    # -- flow control: rates, fair shares, priority, backpressure
    Breakage(
        "a rate that lets each token through one interval early",
        f"{PACKAGE}/lua/admission.lua",
        "return (tonumber(field(meta, 'tat')) or 0) - (burst - 1) * interval",
        "return (tonumber(field(meta, 'tat')) or 0) - burst * interval",
        (
            f"{ADMISSION}test_a_rate_admits_one_per_interval_and_says_when_the_next_token_is_due",
            "tests/test_rate.py::test_a_rate_holds_across_two_workers",
        ),
    ),
    Breakage(
        "a rate's wake-up never scheduled",
        f"{PACKAGE}/worker/pokes.py",
        "        self._due[key] = (due, self._call_later(delay, lambda: self._fire(key, due)))",
        "        return",
        ("tests/test_rate.py::test_the_next_token_wakes_its_waiter_without_polling",),
    ),
    Breakage(
        "a served key that keeps its place in the round robin (first come first served)",
        f"{PACKAGE}/lua/fair.lua",
        "redis.call('ZADD', TURNS, turn, k)",
        "redis.call('ZADD', TURNS, 'NX', turn, k)",
        (f"{ADMISSION}test_a_key_just_served_goes_behind_every_other_waiting_key",),
    ),
    Breakage(
        "weights ignored in a family's round robin",
        f"{PACKAGE}/lua/admission.lua",
        "local weight = tonumber(field(meta, 'weight')) or 1",
        "local weight = 1",
        (
            f"{ADMISSION}test_a_key_of_weight_three_is_served_three_times_in_a_row",
            "tests/test_fair.py::"
            "test_a_key_of_weight_two_takes_two_turns_for_each_turn_of_a_weight_one_key",
        ),
    ),
    Breakage(
        "two weights declared for one key of a family, both accepted",
        f"{PACKAGE}/declarations.py",
        'if known := _other_declaration("weight", family_key(family, key), weight, name):',
        'if known := _other_declaration("weight", name, weight, name):',
        ("tests/test_fair.py::test_tasks_sharing_a_key_in_a_family_must_agree_on_its_weight",),
    ),
    Breakage(
        "an event loop that sleeps a second with timers due (kombu's fire_timers as shipped)",
        f"{PACKAGE}/worker/loop.py",
        "            poll_until_the_next_timer(consumer.hub)\n",
        "            pass\n",
        (
            "tests/test_rate.py::"
            "test_a_celery_rate_limit_backlog_slows_neither_its_own_rate_nor_the_gates",
        ),
    ),
    Breakage(
        "a family's total ignored",
        f"{PACKAGE}/lua/admission.lua",
        "return tonumber(t[1] or t[2]) or UNCAPPED, tonumber(t[3]) or 0",
        "return UNCAPPED, tonumber(t[3]) or 0",
        (
            f"{ADMISSION}test_a_freed_slot_goes_to_the_key_served_least_recently",
            "tests/test_fair.py::test_task_types_naming_one_family_share_its_total",
        ),
    ),
    Breakage(
        "priority ignored in a key's line",
        f"{PACKAGE}/lua/admission.lua",
        "return (spec.rank or 0) * 1e12 + redis.call('HINCRBY', meta, 'seq', 1)",
        "return redis.call('HINCRBY', meta, 'seq', 1)",
        ("tests/test_priority.py::test_on_redis_priority_zero_goes_first_fifo_within_a_priority",),
    ),
    Breakage(
        "a finished run left in the pending count",
        f"{PACKAGE}/lua/admission.lua",
        "if outcome == 'done' or outcome == 'failed' or outcome == 'rejected' then",
        "if outcome == 'failed' or outcome == 'rejected' then",
        (f"{BACKPRESSURE}test_submitting_faster_than_service_is_bounded_and_loses_nothing",),
    ),
    Breakage(
        "a pending count that never lets lapsed tasks go",
        f"{PACKAGE}/lua/submit.lua",
        "redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)\n",
        "",
        (f"{BACKPRESSURE}test_killed_workers_and_a_purged_queue_never_make_the_count_drift",),
    ),
    Breakage(
        "workers that do not vouch for the pending tasks they hold",
        f"{PACKAGE}/lua/admission.lua",
        "    redis.call('ZADD', PENDING, 'GT', now + spec.pending, flow_task(ARGV[i]))\n",
        "",
        (f"{BACKPRESSURE}test_killed_workers_and_a_purged_queue_never_make_the_count_drift",),
    ),
    Breakage(
        "running gauges stuck at 0",
        f"{PACKAGE}/metrics.py",
        "running.add_metric([label(key)], r)",
        "running.add_metric([label(key)], 0)",
        ("tests/test_metrics.py::test_metrics_scrape_matches_the_workload",),
    ),
    Breakage(
        "top refreshing on its own schedule",
        f"{PACKAGE}/cli.py",
        "time.sleep(interval)",
        "time.sleep(1.0)",
        ("tests/test_promises_ops.py::test_top_refreshes_every_interval_and_marks_overrides",),
    ),
    Breakage(
        "an adaptive cap that an overload does not cut",
        f"{PACKAGE}/lua/adapt.lua",
        "  cut(BETA, 'overloaded')\n",
        "",
        (f"{ADAPTIVE}test_the_bounds_are_never_crossed_one_cap_per_key",),
    ),
    Breakage(
        "an adaptive cap that successes do not grow",
        f"{PACKAGE}/pool/execution.py",
        "    feedback.report(task, request, None, time.time() - started)\n",
        "",
        (f"{ADAPTIVE}test_the_bounds_are_never_crossed_one_cap_per_key",),
    ),
    Breakage(
        "a Retry-After that does not pause admissions",
        f"{PACKAGE}/lua/admission.lua",
        "  if until_ms and now < until_ms then return until_ms end",
        "  if false then return until_ms end",
        (f"{ADAPTIVE}test_a_retry_after_pauses_the_key_and_its_end_wakes_the_waiters",),
    ),
    Breakage(
        "a pause whose end wakes nobody",
        f"{PACKAGE}/lua/admission.lua",
        "    if redis.call('ZCARD', KEYS[2]) > 0 then return {}, paused end",
        "    if redis.call('ZCARD', KEYS[2]) > 0 then return {}, nil end",
        (f"{ADAPTIVE}test_a_retry_after_pauses_the_key_and_its_end_wakes_the_waiters",),
    ),
    Breakage(
        "a pin that the adaptive cap overrides",
        f"{PACKAGE}/lua/admission.lua",
        "  local c = redis.call('HMGET', meta, 'override', 'acap', 'cap')",
        "  local c = redis.call('HMGET', meta, 'no-override', 'acap', 'cap')",
        (f"{ADAPTIVE}test_a_pin_wins_until_reset",),
    ),
    Breakage(
        "an adaptive cap deaf to latency",
        f"{PACKAGE}/lua/adapt.lua",
        "local HOLD, CUT, SLACK = 1.3, 2.0, 5",
        "local HOLD, CUT, SLACK = 1e9, 1e9, 5",
        (f"{ADAPTIVE}test_a_rising_latency_holds_the_cap_below_the_knee",),
    ),
    Breakage(
        "a baseline dragged along by the cap's own growth",
        f"{PACKAGE}/lua/adapt.lua",
        "  else base = base + (short - base) * STUCK end",
        "  else base = base + (short - base) * UP end",
        (f"{ADAPTIVE}test_a_rising_latency_holds_the_cap_below_the_knee",),
    ),
    Breakage(
        "every failure of one batch cuts the adaptive cap",
        f"{PACKAGE}/lua/adapt.lua",
        "  if now - latency < cut_at then return end\n",
        "",
        (f"{ADAPTIVE}test_tasks_failing_together_cut_the_cap_once",),
    ),
    Breakage(
        "an adaptive cap that probes its last failure as fast as it grows",
        f"{PACKAGE}/lua/adapt.lua",
        "local BETA, TRIM, PROBE, GAIN = 0.7, 0.9, 16, 0.5",
        "local BETA, TRIM, PROBE, GAIN = 0.7, 0.9, 1, 0.5",
        (f"{ADAPTIVE}test_successes_grow_the_cap_only_while_it_is_used",),
    ),
    Breakage(
        "a slow start that doubles the adaptive cap each round trip",
        f"{PACKAGE}/lua/adapt.lua",
        "math.min(cap + GAIN, thresh)",
        "math.min(cap + 1, thresh)",
        (
            f"{ADAPTIVE}test_slow_start_grows_half_a_slot_per_success_and_cuts_back_to_the_level_before",
        ),
    ),
    Breakage(
        "an adaptive cap grown on holders whose bodies have not started",
        f"{PACKAGE}/lua/adapt.lua",
        "      and (seen < 0 or seen >= math.floor(cap)) then",
        "      then",
        (f"{ADAPTIVE}test_only_a_run_that_started_beside_a_whole_cap_of_bodies_grows_the_cap",),
    ),
    Breakage(
        "a RetryPolicy's backoff left to Celery's fixed retry delay",
        f"{PACKAGE}/task.py",
        "            countdown = policy.delay(int(self.request.retries or 0))\n",
        "            pass\n",
        (
            "tests/test_policies.py::test_a_retry_waits_its_policys_backoff_to_the_fraction_of_a_second",
        ),
    ),
    Breakage(
        "one adaptive cap per worker",
        f"{PACKAGE}/lua/admission.lua",
        "  if c[2] then return math.floor(tonumber(c[2])) end",
        "  if c[2] then return 2 * math.floor(tonumber(c[2])) end",
        (
            f"{ADAPTIVE}test_an_adaptive_cap_is_one_cap_for_every_worker",
            f"{ADAPTIVE}test_two_workers_converge_on_one_cap_near_the_downstreams_capacity",
        ),
    ),
    Breakage(
        "a warm shutdown that drops the jobs handed to pool processes",
        f"{PACKAGE}/worker/shutdown.py",
        "kept = handed(asyn) if asyn._state != RUN else []",
        "kept: list[Any] = []",
        (
            "tests/test_shutdown.py::"
            "test_a_job_handed_to_a_pool_process_does_not_stall_the_warm_shutdown",
        ),
    ),
    Breakage(
        "a script call per task for the worker's safety-net releases",
        f"{PACKAGE}/transport/ended.py",
        "    out = []\n    for op in renewals:\n",
        "    out = [confirming([r]) for rs in ended.values() for r in rs]\n    ended = {}\n"
        "    for op in renewals:\n",
        (
            "tests/test_cap.py::"
            "test_a_task_costs_two_script_calls_its_workers_release_rides_in_the_renewals",
        ),
    ),
    Breakage(
        "a renewal that frees none of the releases it carries",
        f"{PACKAGE}/lua/renew.lua",
        "    flow_free(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]))\n",
        "",
        ("tests/test_transport.py::test_releases_sent_later_ride_in_one_renewal_per_key[threads]",),
    ),
    Breakage(
        "a worker's release sent after a retry's acquire",
        f"{PACKAGE}/transport/base.py",
        "            ops = [self._ended.carry(op) if isinstance(op, Acquire) else op "
        "for op in ops]\n",
        "",
        (
            "tests/test_transport.py::"
            "test_a_release_sent_later_never_frees_the_slot_of_a_retry[eventloop]",
        ),
    ),
    Breakage(
        "a pool process's release that reaps expired leases nobody reports",
        f"{PACKAGE}/lua/release.lua",
        "  ending and worker or nil, ending)",
        "  ending and worker or nil)",
        (
            "tests/test_leases.py::"
            "test_a_release_as_the_body_ends_leaves_expired_leases_to_a_worker_to_report",
        ),
    ),
    Breakage(
        "a grant that does not tell the parked waiter",
        f"{PACKAGE}/lua/admission.lua",
        "    redis.call('RPUSH', list, 'go')\n",
        "",
        (f"{PARKING}test_a_parked_waiter_starts_while_its_worker_is_stopped",),
    ),
    Breakage(
        "parked waiters that keep their processes from other work",
        f"{PACKAGE}/worker/gate.py",
        "        self.parking.make_room()\n",
        "",
        (f"{PARKING}test_a_parked_waiter_gives_its_process_to_unthrottled_work",),
    ),
    Breakage(
        "a parked job whose process died reported lost though it never took its go",
        f"{PACKAGE}/worker/parking.py",
        'return spot is None or self.client.lpop(spot.list) != b"go"',
        "return True",
        (f"{PARKING}test_a_parked_waiter_whose_process_is_killed_waits_again",),
    ),
    Breakage(
        "a revocation that does not reach a parked waiter",
        f"{PACKAGE}/worker/parkjob.py",
        "            gate.parking.revoked(ids)\n",
        "            pass\n",
        (f"{PARKING}test_a_parked_waiter_revoked_never_runs",),
    ),
    Breakage(
        "a parked waiter left to run at a warm shutdown",
        f"{PACKAGE}/worker/gate.py",
        "[h for h in self.lines.waiting() if not self.parking.unpark(h)]",
        "[h for h in self.lines.waiting() if h.park is None]",
        (f"{PARKING}test_a_parked_waiter_is_handed_back_at_warm_shutdown_and_runs_once",),
    ),
    Breakage(
        "a parked waiter the sweep's policies cannot call back",
        f"{PACKAGE}/worker/sweep.py",
        "        gate.parking.recall(held)\n        return\n",
        "        return\n",
        (f"{PARKING}test_a_parked_waiter_past_max_wait_is_rejected_unrun",),
    ),
    Breakage(
        "a first park that marks its holder itself (park.lua), though its acquire did",
        f"{PACKAGE}/worker/parking.py",
        "marked = bool(held.park_nonce)",
        'marked, held.park_nonce = False, ""',
        (f"{PARKING}test_a_parked_hand_off_costs_one_blpop_and_no_script_call_of_its_own",),
    ),
    Breakage(
        "an acquire that does not mark its waiter parked",
        f"{PACKAGE}/lua/acquire.lua",
        "  redis.call('HSETNX', parked, holder, ARGV[7])\n",
        "",
        (
            "tests/test_leases.py::"
            "test_an_acquire_marks_a_waiter_parked_and_its_entry_goes_as_it_leaves_the_line",
        ),
    ),
    Breakage(
        "a waiter released ungranted leaves its park mark behind",
        f"{PACKAGE}/lua/free.lua",
        "  if waited > 0 then redis.call('HDEL', flow_parked(KEYS[1]), holder) end\n",
        "",
        (
            "tests/test_leases.py::"
            "test_an_acquire_marks_a_waiter_parked_and_its_entry_goes_as_it_leaves_the_line",
        ),
    ),
    Breakage(
        "a dead worker's waiter leaves its park mark behind",
        f"{PACKAGE}/lua/grant.lua",
        "      redis.call('HDEL', parked, unpack(dead, i, math.min(i + 499, #dead)))\n",
        "",
        (
            "tests/test_leases.py::"
            "test_an_acquire_marks_a_waiter_parked_and_its_entry_goes_as_it_leaves_the_line",
        ),
    ),
    Breakage(
        "a waiter parked whatever its Celery time limits",
        f"{PACKAGE}/worker/parking.py",
        "            and not any(req.time_limits or ())\n",
        "",
        (f"{PARKING}test_a_waiter_with_a_celery_time_limit_is_not_parked_and_keeps_its_limit",),
    ),
    Breakage(
        "parking on a worker with Celery time limits for every task",
        f"{PACKAGE}/worker/parking.py",
        "        if self.enabled and (conf.task_time_limit or conf.task_soft_time_limit):\n",
        "        if False:\n",
        (f"{PARKING}test_on_a_worker_with_celery_time_limits_for_every_task_nothing_is_parked",),
    ),
    Breakage(
        "throttle_park ignored",
        f"{PACKAGE}/worker/parking.py",
        "            gate.settings.park\n            and ",
        "            ",
        (f"{PARKING}test_with_throttle_park_off_nothing_is_parked",),
    ),
]


class DrillError(Exception):
    """The drill itself is out of date: an edit that no longer applies, a test that is gone."""


@dataclass
class Result:
    name: str
    tests: str
    outcome: str  # "caught" or "survived"
    seconds: float


def tracked_files(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


@contextmanager
def scratch_copy() -> Iterator[Path]:
    """The repository's files (tracked, and new ones not ignored) in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="breakage-drill-") as tmp:
        copy = Path(tmp) / "repo"
        for name in tracked_files(ROOT):
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
        yield copy


def environment(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CI")}
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "plugin")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_copy_runs_its_own_code(copy: Path, env: dict[str, str]) -> None:
    found = subprocess.run(
        [sys.executable, "-c", "import celery_throttled; print(celery_throttled.__file__)"],
        cwd=copy, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not Path(found).resolve().is_relative_to(copy.resolve()):
        raise DrillError(f"the scratch copy imports celery_throttled from {found}, not its own")


def check_tests_exist(copy: Path, env: dict[str, str], breakages: list[Breakage]) -> None:
    wanted = sorted({test for b in breakages for test in b.tests})
    listed = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *wanted],
        cwd=copy, env=env, capture_output=True, text=True,
    )  # fmt: skip
    collected = {line.strip() for line in listed.stdout.splitlines()}
    missing = [test for test in wanted if test not in collected]
    if listed.returncode != 0 or missing:
        raise DrillError(f"tests named by the drill are gone: {missing}\n{listed.stdout[-2000:]}")


def apply(copy: Path, breakage: Breakage) -> str:
    """Apply the edit; returns the file's original text. Fails unless ``old`` occurs once."""
    path = copy / breakage.file
    if not path.exists():
        raise DrillError(f"{breakage.name!r}: {breakage.file} does not exist")
    original = path.read_text()
    count = original.count(breakage.old)
    if count != 1:
        raise DrillError(
            f"{breakage.name!r}: the text to replace occurs {count} times in {breakage.file} "
            f"(must be exactly once):\n{breakage.old}"
        )
    path.write_text(original.replace(breakage.old, breakage.new))
    return original


def drill(copy: Path, env: dict[str, str], breakage: Breakage, log: Path) -> Result:
    original = apply(copy, breakage)
    began = time.monotonic()
    try:
        with log.open("a") as out:
            out.write(f"\n===== {breakage.name} =====\n")
            out.flush()
            ran = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0",
                 *breakage.tests],
                cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600,
            )  # fmt: skip
    finally:
        (copy / breakage.file).write_text(original)
    if ran.returncode not in (0, 1):
        raise DrillError(f"{breakage.name!r}: pytest exited {ran.returncode}; see {log}")
    outcome = "caught" if ran.returncode == 1 else "survived"
    tests = ", ".join(t.split("::", 1)[1] for t in breakage.tests)
    return Result(breakage.name, tests, outcome, time.monotonic() - began)


def table(results: list[Result]) -> str:
    rows = [("breakage", "tests run", "result", "seconds")]
    rows += [(r.name, r.tests, r.outcome, f"{r.seconds:.0f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
             for row in rows]  # fmt: skip
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", help="comma-separated breakage names (or parts of them)")
    parser.add_argument("--list", action="store_true", help="list the breakages and exit")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that every edit applies and every test exists (seconds; CI runs it)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    chosen = BREAKAGES
    if args.only:
        parts = [p.strip() for p in args.only.split(",") if p.strip()]
        chosen = [b for b in BREAKAGES if any(p in b.name for p in parts)]
    if args.list:
        for b in chosen:
            print(f"{b.name}: {b.file} -> {', '.join(b.tests)}")
        return 0
    began = time.monotonic()
    results: list[Result] = []
    with scratch_copy() as copy:
        env = environment(copy)
        check_copy_runs_its_own_code(copy, env)
        check_tests_exist(copy, env, chosen)
        for breakage in chosen:  # every edit must apply before any test runs
            (copy / breakage.file).write_text(apply(copy, breakage))
        if args.check:
            print(f"{len(chosen)} breakages apply, and the tests they name exist")
            return 0
        log = copy.parent / "drill.log"
        try:
            for breakage in chosen:
                result = drill(copy, env, breakage, log)
                results.append(result)
                print(f"{result.outcome:8}  {result.seconds:4.0f} s  {result.name}", flush=True)
        except BaseException:
            if log.exists():
                sys.stdout.write(log.read_text()[-6000:])
            raise
        survivors = [r for r in results if r.outcome != "caught"]
        if survivors and log.exists():
            sys.stdout.write(log.read_text()[-6000:])
    elapsed = time.monotonic() - began
    print()
    print(table(results))
    print(f"\n{len(results) - len(survivors)} of {len(results)} caught in {elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
