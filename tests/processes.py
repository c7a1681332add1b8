"""Helpers of the tests that look at a run's processes (issue #15): its process tree, which of them still run,
and the sockets they listen on."""

from __future__ import annotations

import ipaddress
import socket
import time

import psutil


def tree(pid: int, size: int = 1, seconds: float = 30.0) -> list[int]:
    """`pid` and its descendants, once there are at least `size` processes."""
    deadline = time.monotonic() + seconds
    while True:
        pids = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
        if len(pids) >= size or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


def alive(pids: list[int]) -> list[str]:
    """'name (pid)' of each of `pids` still running (a zombie has exited)."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.name()} ({pid})")
        except psutil.NoSuchProcess:
            pass
    return found


def gone(pids: list[int], seconds: float = 5.0) -> list[str]:
    """`alive(pids)` once it is empty or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def listening(pids: list[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket listening, and every UDP socket bound, in `pids`."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
                    found.append((process.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            pass
    return found


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also written as an IPv4-mapped IPv6 address (::ffff:127.0.0.1: an IPv6 socket of gRPC)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def beyond_loopback(pids: list[int]) -> list[tuple[str, str, int]]:
    """The sockets of `pids` a peer on the network could connect to."""
    return [s for s in listening(pids) if not is_loopback(s[1])]
