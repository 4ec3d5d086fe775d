"""The IAM service's settings, read once from the environment."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rucher.service import Settings, env_number


@dataclass(frozen=True)
class IamSettings:
    """What the IAM service reads beyond every service's ``RUCHER_*`` settings."""

    base: Settings
    admin_password: str | None
    pam_service: str
    failure_delay: tuple[float, float]
    throttle_after: int
    throttle_max: float
    throttle_window: float
    key_rotation: float
    clustername: str | None
    oidc_timeout: float

    @property
    def admin_password_file(self) -> Path:
        """Where a generated admin@pve password is written once (mode 0600)."""
        return self.base.state_dir / "admin-password"

    @classmethod
    def from_env(cls, base: Settings, environ: Mapping[str, str] = os.environ) -> IamSettings:
        """Read the settings, naming the variable at fault when one is wrong."""
        number = functools.partial(env_number, environ)

        delay = number("RUCHER_LOGIN_FAILURE_DELAY", 2.5, 0.0)
        return cls(
            base=base,
            admin_password=environ.get("RUCHER_ADMIN_PASSWORD") or None,
            pam_service=environ.get("RUCHER_PAM_SERVICE", "rucher"),
            failure_delay=(delay * 0.8, delay * 1.2),
            throttle_after=int(number("RUCHER_LOGIN_THROTTLE_AFTER", 3, 1)),
            throttle_max=number("RUCHER_LOGIN_THROTTLE_MAX", 30.0, 0.0),
            throttle_window=number("RUCHER_LOGIN_THROTTLE_WINDOW", 900.0, 1.0),
            key_rotation=number("RUCHER_TICKET_KEY_ROTATION", 86_400.0, 60.0),
            clustername=environ.get("RUCHER_CLUSTER_NAME") or None,
            oidc_timeout=number("RUCHER_OIDC_TIMEOUT", 10.0, 1.0),
        )
