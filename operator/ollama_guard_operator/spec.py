"""The GuardProxy and ScanNode specs as pydantic models: the CRD's defaults, plus checks a schema cannot say.

The CRD (crds/*.yaml) applies the same defaults server-side; the models repeat them so that the builders get
a complete spec from any API server (and from tests), and so that cross-field rules live in one place.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

__all__ = ["GuardProxySpec", "InvalidSpec", "ScanNodeSpec", "Variant", "parse_guardproxy", "parse_scannode"]

DEFAULT_IMAGE = "ghcr.io/ollama-guard/ollama-guard"
DEFAULT_TAG = "0.1.0"
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?m?$")


class InvalidSpec(ValueError):
    """The object's spec cannot be built; the message says why, for the status."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Image(_Model):
    repository: str = DEFAULT_IMAGE
    tag: str = DEFAULT_TAG
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    pull_secrets: list[str] = []

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


class SecretKey(_Model):
    name: str = Field(min_length=1)
    key: str


class ApiKeysSecret(SecretKey):
    key: str = "api-keys.yaml"


class AdminTokenSecret(SecretKey):
    key: str = "token"


class Auth(_Model):
    api_keys_secret: ApiKeysSecret | None = None
    admin_token_secret: AdminTokenSecret | None = None


class PullJob(_Model):
    enabled: bool = False
    command: list[str] = ["ollama-guard", "models", "pull"]
    backoff_limit: int = Field(default=3, ge=0)


class Models(_Model):
    persistent_volume_claim: str | None = None
    size_limit: str = "20Gi"
    read_only: bool = True
    pull_job: PullJob = PullJob()

    @model_validator(mode="after")
    def _pull_needs_a_volume(self) -> Models:
        if self.pull_job.enabled and not self.persistent_volume_claim:
            raise ValueError("models.pullJob needs models.persistentVolumeClaim: an emptyDir would not outlive the Job")
        return self


class Autoscaling(_Model):
    enabled: bool = False
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=5, ge=1)
    target_requests_per_second: str = "10"
    target_cpu_utilization: int = Field(default=70, ge=1, le=100, alias="targetCPUUtilization")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.minReplicas ({self.min_replicas}) exceeds maxReplicas ({self.max_replicas})")
        if not QUANTITY.match(self.target_requests_per_second):
            raise ValueError(f"autoscaling.targetRequestsPerSecond {self.target_requests_per_second!r} is no quantity")
        return self


class Pdb(_Model):
    enabled: bool = True
    max_unavailable: int = Field(default=1, ge=0)


class Variant(_Model):
    enabled: bool | None = None
    replicas: int = Field(default=2, ge=0)
    resources: dict[str, Any] = {}
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    runtime_class_name: str | None = None
    gpu_count: int | None = Field(default=None, ge=0)
    pod_anti_affinity: Literal["preferred", "required", "none"] = "preferred"
    pdb: Pdb = Pdb()
    autoscaling: Autoscaling = Autoscaling()


class Variants(_Model):
    cpu: Variant = Variant()
    cuda: Variant = Variant()


class ManagedRedis(_Model):
    image: str = "redis:7.2-alpine"
    storage: str = "1Gi"
    storage_class_name: str | None = None
    max_memory: str = Field(default="256mb", pattern=r"^[0-9]+(b|kb|mb|gb)?$")
    eviction_policy: Literal[
        "allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "allkeys-random", "volatile-ttl"
    ] = "allkeys-lru"
    resources: dict[str, Any] = {}


class UrlSecret(SecretKey):
    key: str = "url"


class PasswordSecret(SecretKey):
    key: str = "password"


class ExternalRedis(_Model):
    url: str | None = Field(default=None, pattern=r"^rediss?://")
    url_secret: UrlSecret | None = None
    password_secret: PasswordSecret | None = None


class Redis(_Model):
    mode: Literal["managed", "external", "disabled"] = "managed"
    managed: ManagedRedis = ManagedRedis()
    external: ExternalRedis | None = None

    @model_validator(mode="after")
    def _external_has_a_url(self) -> Redis:
        if self.mode == "external":
            ext = self.external
            if ext is None or (ext.url is None) == (ext.url_secret is None):
                raise ValueError("redis.mode=external needs exactly one of redis.external.url or .urlSecret")
        return self


class ServiceMonitor(_Model):
    enabled: bool = True
    interval: str = "30s"
    labels: dict[str, str] = {}


class Monitoring(_Model):
    service_monitor: ServiceMonitor = ServiceMonitor()


class Service(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(default=8080, ge=1, le=65535)
    annotations: dict[str, str] = {}


class Upstream(_Model):
    url: str = Field(pattern=r"^https?://[^\s/]+(/.*)?$")


class GuardProxySpec(_Model):
    upstream: Upstream
    image: Image = Image()
    config: dict[str, Any] = {}
    auth: Auth = Auth()
    models: Models = Models()
    variants: Variants = Variants()
    redis: Redis = Redis()
    monitoring: Monitoring = Monitoring()
    service: Service = Service()

    def enabled_variants(self) -> dict[str, Variant]:
        """The variants that run in the cluster: cpu unless disabled, cuda when enabled."""
        out: dict[str, Variant] = {}
        if self.variants.cpu.enabled is not False:
            out["cpu"] = self.variants.cpu
        if self.variants.cuda.enabled:
            out["cuda"] = self.variants.cuda
        return out

    @model_validator(mode="after")
    def _cross_checks(self) -> GuardProxySpec:
        if self.variants.cuda.enabled and self.variants.cuda.gpu_count == 0:
            raise ValueError("variants.cuda.gpuCount must be at least 1: the cuda variant runs on a GPU")
        if self.variants.cpu.gpu_count:
            raise ValueError("variants.cpu.gpuCount must be empty: the cpu variant requests no GPU")
        return self


class Probe(_Model):
    timeout_seconds: float = Field(default=2.0, ge=0.1)
    failure_threshold: int = Field(default=2, ge=1)
    success_threshold: int = Field(default=1, ge=1)


def address_problem(address: str) -> str | None:
    """Why an EndpointSlice cannot list `address`, or None when it can (a DNS name is not checked here).

    The API server refuses endpoint IPs that are unspecified, loopback (127.0.0.0/8, ::1) or link-local
    (169.254.0.0/16, fe80::/10, and the link-local multicast ranges) with a 422 for the whole slice
    (Kubernetes ValidateEndpointIP; captured: shared/k8s-real/04-response-422-*.json).
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.is_unspecified:
        return f"{address} is unspecified"
    if ip.is_loopback:
        return f"{address} is in the loopback range (127.0.0.0/8, ::1/128)"
    link_local_multicast = (
        ip in ipaddress.ip_network("224.0.0.0/24") if ip.version == 4 else ip in ipaddress.ip_network("ff02::/16")
    )
    if ip.is_link_local or link_local_multicast:
        return f"{address} is in the link-local range (169.254.0.0/16, fe80::/10)"
    return None


class ScanNodeSpec(_Model):
    guard_proxy: str = Field(min_length=1)
    address: str = Field(min_length=1)
    port: int = Field(default=8080, ge=1, le=65535)
    scheme: Literal["http", "https"] = "http"
    health_path: str = Field(default="/health", pattern=r"^/")
    probe: Probe = Probe()

    @model_validator(mode="after")
    def _endpoint_address(self) -> ScanNodeSpec:
        problem = address_problem(self.address)
        if problem:
            raise ValueError(f"address {problem}: a Service cannot route to it, so no EndpointSlice may list it")
        return self

    @property
    def address_type(self) -> Literal["IPv4", "IPv6", "FQDN"]:
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            return "FQDN"
        return "IPv4" if ip.version == 4 else "IPv6"

    @property
    def health_url(self) -> str:
        host = f"[{self.address}]" if self.address_type == "IPv6" else self.address
        return f"{self.scheme}://{host}:{self.port}{self.health_path}"


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def parse_guardproxy(spec: dict[str, Any]) -> GuardProxySpec:
    """Validate a GuardProxy's spec and fill in its defaults; InvalidSpec says what is wrong."""
    try:
        return GuardProxySpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise InvalidSpec(_explain(exc)) from None


def parse_scannode(spec: dict[str, Any]) -> ScanNodeSpec:
    """Validate a ScanNode's spec and fill in its defaults; InvalidSpec says what is wrong."""
    try:
        return ScanNodeSpec.model_validate(dict(spec))
    except ValidationError as exc:
        raise InvalidSpec(_explain(exc)) from None
