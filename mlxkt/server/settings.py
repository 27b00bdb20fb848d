"""Server settings and the bind-address safety rule."""

import ipaddress
from dataclasses import dataclass
from typing import Optional, Tuple

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("0.0.0.0", "::", "")


def check_bind(host: str, api_key: Optional[str], insecure: bool) -> None:
    """Refuses to expose the server beyond this machine without an API key.

    Raises ValueError with the reason; `--insecure` overrides it on purpose.
    """
    if is_loopback(host) or api_key or insecure:
        return
    raise ValueError(
        f"refusing to listen on {host} without --api-key: anyone on the network could use "
        "the model. Pass --api-key (or MLXKT_API_KEY), or --insecure to do it anyway."
    )


def split_list(value: Optional[str]) -> Tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')"""
    if not value:
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: Optional[str] = None
    insecure: bool = False
    # Origins allowed to call the API from a browser (CORS); empty: same origin only.
    allowed_origins: Tuple[str, ...] = ()
    # Extra Host header names accepted (reverse proxies, LAN names); loopback names and the
    # bind address are always accepted. "*" accepts any Host.
    allowed_hosts: Tuple[str, ...] = ()
    max_queue: int = 32  # requests waiting behind the running one
    max_body_bytes: int = 4 * 1024 * 1024
    default_max_tokens: int = 2048
    context_length: int = 4096

    def host_allowed(self, host_header: str) -> bool:
        name = _strip_port(host_header).lower()
        if not name:
            return False
        if "*" in self.allowed_hosts or is_loopback(name):
            return True
        if not is_wildcard(self.host) and name == self.host.strip("[]").lower():
            return True
        if is_wildcard(self.host) and not self.allowed_hosts:
            # Bound to every interface (only possible with a key or --insecure): the names
            # this machine answers to are unknown, so any Host is accepted.
            return True
        return name in (h.lower() for h in self.allowed_hosts)


def _strip_port(host_header: str) -> str:
    # "[::1]:8080" -> "::1", "example:80" -> "example"
    h = host_header.strip()
    if h.startswith("["):
        return h[1:].split("]", 1)[0]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h
