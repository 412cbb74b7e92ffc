"""Where a webhook may be sent: http(s) URLs whose host resolves to public addresses only.

A webhook URL is chosen by a project, but the request is made from inside the deployment, next to the
database, the inference server and the cloud's metadata service. So a URL whose host is, or resolves to,
a loopback, private, link-local, shared, reserved or multicast address is refused unless the operator
allows it (TUNEFORGE_WEBHOOKS_ALLOW_PRIVATE). The check runs when an endpoint is registered and again at
every delivery, on the very address the request then connects to: DNS can change in between.
"""

import ipaddress
import socket

import httpx

SCHEMES = ("http", "https")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedURL(ValueError):
    """A webhook URL that may not be called; the message says why."""


def parse(url: str) -> httpx.URL:
    """The URL, if it is an absolute http(s) URL with a host; else RefusedURL."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise RefusedURL(f"'{url}' is not a valid URL ({exc}).") from None
    if parsed.scheme not in SCHEMES:
        raise RefusedURL(f"Webhook URLs must use http or https, not '{parsed.scheme or 'no scheme'}'.")
    if not parsed.host:
        raise RefusedURL(f"'{url}' has no host.")
    return parsed


def is_public(address: IPAddress) -> bool:
    """Whether `address` is on the public internet; an IPv4-mapped IPv6 address is its IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def resolve(url: httpx.URL) -> list[IPAddress]:
    """The addresses the URL's host stands for (the host itself when it is an IP address)."""
    host = url.raw_host.decode("ascii")  # internationalised names as their ASCII (IDNA) form
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise LookupError(f"the host '{url.host}' does not resolve ({exc})") from None
    # getaddrinfo's address is (host, port) or (host, port, flow, scope); a scope suffix ('%eth0') goes
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in found))


def check(addresses: list[IPAddress], *, host: str) -> None:
    """RefusedURL if any of `addresses` (those of `host`) is not public."""
    private = [str(a) for a in addresses if not is_public(a)]
    if private:
        raise RefusedURL(
            f"Webhook URLs must reach the public internet; '{host}' is {', '.join(private)}. An operator can "
            "allow private addresses with TUNEFORGE_WEBHOOKS_ALLOW_PRIVATE=1."
        )


def check_registration(url: str, *, allow_private: bool) -> None:
    """RefusedURL for a URL an endpoint may not have. A host that does not resolve yet is accepted: each
    delivery resolves it again, and records the failure while it does not resolve."""
    parsed = parse(url)
    if not allow_private:
        try:
            check(resolve(parsed), host=parsed.host)
        except LookupError:
            pass
