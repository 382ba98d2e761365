"""What every stage of the request path shares: the settings and the long-lived things the lifespan owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from .cache import VerdictCache
from .metrics import Metrics
from .ratelimit import RateLimiter
from .requests import Validator
from .scanning.engine import ScanEngine
from .scanning.policy import Policy
from .security import Authenticator
from .settings import Settings
from .stats import Stats
from .upstream import Upstream


@dataclass
class ProxyState:
    settings: Settings
    metrics: Metrics
    stats: Stats = field(default_factory=Stats)
    policy: Policy | None = None
    engine: ScanEngine | None = None
    cache: VerdictCache | None = None
    upstream: Upstream | None = None
    limiter: RateLimiter | None = None
    auth: Authenticator | None = None
    validator: Validator | None = None
    ready_reasons: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        return self.policy.device.name if self.policy and self.policy.device else "cpu"
