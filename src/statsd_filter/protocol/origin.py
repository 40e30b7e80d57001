"""Origin detection through the proxy: which container sent a line, in DogStatsD's terms.

The Datadog agent attributes a metric received on its Unix socket to the
sending container by the sender's pid (``SO_PASSCRED``): it reads
``/proc/<pid>/cgroup`` and finds the container id in the cgroup path. Behind a
proxy it would only see the proxy. So a proxy that knows the sender's pid can
name the container itself, with DogStatsD's container field ``|c:ci-<id>``
(protocol v1.2), which the agent honours as it would its own detection.

Two pure functions here: :func:`container_id` finds the id in a cgroup file's
text (the last path component that is a container id: 64 hex digits, as
Docker, containerd and CRI-O name them, possibly inside ``docker-<id>.scope``
or ``cri-containerd-<id>.scope``; an ECS task's ``<32 hex>-<digits>``; or a
UUID), and :func:`add_container_field` appends the field to every line of a
chunk that has no container field yet, in one C-level substitution.
"""

from __future__ import annotations

import re

__all__ = ["add_container_field", "container_id"]

_ID = (
    r"[0-9a-f]{64}"
    r"|[0-9a-f]{32}-\d+"
    r"|[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
)
# The last component of a cgroup path: an id, alone or wrapped by a runtime's
# prefix (``docker-``, ``cri-containerd-``, ``crio-``) and a ``.scope`` suffix.
_COMPONENT = re.compile(rf"(?:.*[-_])?({_ID})(?:\.scope)?")
# A line that is not empty (nor a lone ``\r``) and has no ``|c:`` field; one ``\r``
# ending is left out of the match (so it is dropped, as the filter would drop it).
_UNTAGGED = re.compile(rb"(?m)^(?!\r?$)(?![^\n]*\|c:)([^\n]*?)\r?$")


def container_id(cgroup_text: str) -> str | None:
    """The container id in the text of a ``/proc/<pid>/cgroup`` file, or None."""
    for line in cgroup_text.splitlines():
        # hierarchy-id:controllers:path (cgroup v1), or 0::path (v2).
        path = line.split(":", 2)[-1]
        last = path.rstrip("/").rpartition("/")[2]
        match = _COMPONENT.fullmatch(last)
        if match:
            return match.group(1)
    return None


def add_container_field(chunk: bytes, cid: str) -> tuple[bytes, int]:
    """Append ``|c:ci-<cid>`` to each line of ``chunk`` that has no container field;
    returns the new chunk and how many lines got it."""
    return _UNTAGGED.subn(b"\\1|c:ci-" + cid.encode("ascii"), chunk)
