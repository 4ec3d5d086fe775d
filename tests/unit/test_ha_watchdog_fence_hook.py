"""The external fence hook (rucher.ha.fence): exit status decides, a hang times out."""

from __future__ import annotations

import time

from rucher.ha.config import FenceHookSettings
from rucher.ha.fence import hook_argv, run_fence_hook


def test_the_node_is_substituted_or_appended():
    assert hook_argv(FenceHookSettings(command=("ipmi", "-H", "{node}-bmc", "off")), "n2") == [
        "ipmi",
        "-H",
        "n2-bmc",
        "off",
    ]
    assert hook_argv(FenceHookSettings(command=("power-off",)), "n2") == ["power-off", "n2"]


async def test_no_hook_configured():
    assert await run_fence_hook(FenceHookSettings(), "n1") is None


async def test_exit_zero_fences():
    result = await run_fence_hook(FenceHookSettings(command=("sh", "-c", "echo off $0")), "n1")
    assert result is not None and result.fenced and result.output.strip() == "off n1"


async def test_a_failing_hook_does_not_fence():
    result = await run_fence_hook(FenceHookSettings(command=("sh", "-c", "echo no; exit 3")), "n1")
    assert result is not None and not result.fenced and result.exit_status == 3
    assert result.reason == "fence hook exited with status 3: no"


async def test_a_hanging_hook_times_out_and_is_killed():
    started = time.monotonic()
    result = await run_fence_hook(
        FenceHookSettings(command=("sh", "-c", "sleep 30; true"), timeout=1.0), "n1"
    )
    assert result is not None and not result.fenced and result.exit_status is None
    assert time.monotonic() - started < 5
    assert result.reason == "fence hook timed out"


async def test_a_missing_command_does_not_fence():
    result = await run_fence_hook(FenceHookSettings(command=("/nonexistent/fence",)), "n1")
    assert result is not None and not result.fenced and result.exit_status == 127
