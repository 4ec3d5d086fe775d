"""The service runner, settings and logging shared by every Rucher service."""

from rucher.service.runner import ServiceContext, main, run_service
from rucher.service.settings import LogFormat, Settings, SettingsError, env_number

__all__ = [
    "LogFormat",
    "ServiceContext",
    "Settings",
    "SettingsError",
    "env_number",
    "main",
    "run_service",
]
