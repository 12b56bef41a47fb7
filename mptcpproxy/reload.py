"""SIGHUP with --config: read the file again and apply it to the running proxy.

New listeners start, removed ones drain (new connections reset, open ones go on, the socket
closes after the last), changed ones take their new settings for new connections; open
connections are never touched. A listener whose socket must change (mode, address,
transparent mode) is replaced: the new socket opens beside the old one (SO_REUSEPORT) and
the old one drains. A file that fails to load, or a listener that cannot start, is logged
and the running configuration stays as it was. Process-wide settings that only a restart
can change (workers, buffer_size, busy_poll, path_stats, metrics) are reported, not applied.
"""

from __future__ import annotations

import dataclasses
import logging

from mptcpproxy import configfile, logsetup
from mptcpproxy.config import Config, ConfigError
from mptcpproxy.listener import Listener, ListenerError

log = logging.getLogger("mptcpproxy")

RESTART_ONLY = ("workers", "buffer_size", "busy_poll", "path_stats", "metrics")


async def reload(proxy) -> bool:
    """Apply the configuration file again; True when it was applied."""
    path = proxy.config_path
    try:
        loaded = configfile.load(path)
    except ConfigError as exc:
        return _failed(proxy, str(exc))
    old = proxy.config
    # What only a restart changes stays as it runs, in every listener's configuration.
    configs = [dataclasses.replace(c, **{k: getattr(old, k) for k in RESTART_ONLY})
               for c in loaded.listeners]
    new = {c.port: c for c in configs}
    running = proxy.listeners
    added = [c for port, c in new.items() if port not in running]
    replaced = [c for port, c in new.items()
                if port in running and not running[port].config.same_socket(c)]
    changed = [c for port, c in new.items()
               if port in running and running[port].config.same_socket(c)
               and running[port].config != c]
    removed = [lst for port, lst in running.items() if port not in new]
    try:
        started = await proxy._prepare([*added, *replaced])
    except ListenerError as exc:
        return _failed(proxy, str(exc))
    if proxy.stopping is not None and proxy.stopping.is_set():
        # the stop signal came while the new sockets opened (a name still resolving): the
        # proxy is leaving, so none of them serves nor installs its rules (see _on_hangup)
        _discard(proxy, started)
        log.info("reload: stopping; %s is not applied", path)
        return False
    # A replaced listener's rules go first: the new one's have the same names (the port).
    outgoing = [running[c.port] for c in replaced]
    for lst in outgoing:
        lst.restore_firewall()
    try:
        for lst in started:
            lst.setup_firewall()
    except Exception as exc:  # firewall.FirewallError
        _discard(proxy, started)
        for lst in outgoing:
            lst.setup_firewall()  # back as they were
        return _failed(proxy, str(exc))
    for lst in removed:
        _retire(proxy, lst)
    for old_listener in outgoing:
        del running[old_listener.config.port]
        old_listener.hand_over()
        proxy.retired.append(old_listener)
    for lst in started:
        proxy.listeners[lst.config.port] = lst
        lst.start()
    for lst in proxy.retired:
        if lst.draining and lst.config.port in new:
            # its port is back: the new socket shares it (SO_REUSEPORT), so this one must
            # not reset the clients the kernel gives it: they are swept, then it closes
            lst.hand_over()
    for c in changed:
        proxy.listeners[c.port].update(c)
    _apply_settings(proxy, loaded.listeners[0], loaded.settings)
    proxy.configs = tuple(configs)
    proxy.metrics.config_reload("success")
    log.info("reload: %s: %d listener(s); %d added, %d removed, %d replaced, %d changed",
             path, len(proxy.listeners), len(added), len(removed), len(replaced), len(changed))
    if proxy._retired_timer is None:
        proxy._close_retired()
    return True


def _discard(proxy, started: list[Listener]) -> None:
    for lst in started:
        lst.close()
        proxy.by_tag.pop(lst.tag, None)


def _failed(proxy, why: str) -> bool:
    proxy.metrics.config_reload("failure")
    log.error("reload failed: %s; the running configuration stays", why)
    return False


def _retire(proxy, lst: Listener) -> None:
    del proxy.listeners[lst.config.port]
    lst.stop_diverting()
    lst.drain()
    proxy.retired.append(lst)
    if lst.open_count:
        log.info("listener %s: removed; closing after its %d open connection(s)", lst.title,
                 lst.open_count)


def _apply_settings(proxy, first: Config, settings) -> None:
    old = proxy.config
    for key in RESTART_ONLY:
        if getattr(old, key) != getattr(first, key):
            log.warning("reload: %s changed (%s -> %s): it takes effect at the next restart",
                        key, getattr(old, key), getattr(first, key))
    level = (logging.DEBUG if settings.verbose else logging.WARNING if settings.quiet
             else logging.INFO)
    if proxy.cli_level is not None:
        level = proxy.cli_level  # -v or -q on the command line wins
    try:
        logsetup.setup_logging(level, settings.log_file, settings.log_format,
                               handle_sighup=False)
    except ConfigError as exc:
        log.error("reload: %s; logging stays as it was", exc)
