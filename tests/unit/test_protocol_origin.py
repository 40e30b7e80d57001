"""Unit tests for statsd_filter.protocol.origin: container ids from cgroup files, |c: fields."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.protocol.lines import split_lines
from statsd_filter.protocol.origin import add_container_field, container_id

CID = "3726184226f5d3147c25fdeab5b60097e378e8a720503a5e19ecfdf29f869860"
TASK = "34dc0b5e626f2c5c4c5170e34b10e765-1234567890"
UUID = "e9ba1f5c-37b1-4e0a-a77e-6f9d77c71c0b"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Docker, cgroup v1.
        (f"12:memory:/docker/{CID}\n11:cpu:/docker/{CID}\n", CID),
        # Docker under systemd.
        (f"1:name=systemd:/system.slice/docker-{CID}.scope\n", CID),
        # Kubernetes with containerd, cgroup v2.
        (
            (
                "0::/kubepods.slice/kubepods-burstable.slice/"
                f"kubepods-burstable-pod{UUID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"
            ),
            CID,
        ),
        # Kubernetes with CRI-O, cgroup v1.
        (f"4:pids:/kubepods/besteffort/pod{UUID}/crio-{CID}.scope\n", CID),
        # Kubernetes with Docker, cgroup v1: the pod's directory, then the container's.
        (f"9:blkio:/kubepods/burstable/pod{UUID}/{CID}\n", CID),
        # ECS Fargate task container.
        (f"1:cpu:/ecs/{TASK.split('-', 1)[0]}/{TASK}\n", TASK),
        # A bare UUID (e.g. Cloud Foundry's garden).
        (f"1:name=systemd:/system.slice/garden.service/garden/{UUID}\n", UUID),
        # Not in a container.
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        ("0::/\n", None),
        ("", None),
        # A pod directory alone is not a container.
        (f"0::/kubepods.slice/kubepods-pod{UUID.replace('-', '_')}.slice\n", None),
    ],
)
def test_container_id_from_cgroup_text(text: str, expected: str | None) -> None:
    """The container id is found in each runtime's cgroup layout, and nowhere else."""
    assert container_id(text) == expected


def test_add_container_field_only_where_missing() -> None:
    """Lines without a container field get one; others, and empty lines, are untouched."""
    chunk = b"a:1|c\nb:2|c|#x:y|c:ci-abc\n\nc:3|g|#env:dev\n_e{1,1}:t|x\n_sc|chk|0"
    tagged, count = add_container_field(chunk, CID)
    field = b"|c:ci-" + CID.encode()
    assert tagged == (
        b"a:1|c" + field + b"\nb:2|c|#x:y|c:ci-abc\n\nc:3|g|#env:dev" + field + b"\n"
        b"_e{1,1}:t|x" + field + b"\n_sc|chk|0" + field
    )
    assert count == 4


def test_add_container_field_drops_a_cr_ending() -> None:
    """A \\r\\n line ending does not end up inside the field (the \\r is dropped)."""
    tagged, count = add_container_field(b"a:1|c\r\nb:1|c\r", "f" * 64)
    assert tagged == b"a:1|c|c:ci-" + b"f" * 64 + b"\nb:1|c|c:ci-" + b"f" * 64
    assert count == 2


def test_a_counter_type_is_not_mistaken_for_the_field() -> None:
    """'|c' (the counter type) is not a container field: '|c:' is."""
    tagged, count = add_container_field(b"x:1|c|#c:d", "a" * 64)
    assert tagged == b"x:1|c|#c:d|c:ci-" + b"a" * 64
    assert count == 1


# Bytes that matter here: CR (line endings), the field's own characters, non-UTF-8.
_LINE = st.one_of(
    st.binary(max_size=30),
    st.lists(st.sampled_from([b"a", b"|", b"c", b":", b"\r", b"\xff", b"#"]), max_size=20).map(
        b"".join
    ),
).map(lambda b: b.replace(b"\n", b""))


@settings(max_examples=500, deadline=None)
@given(st.lists(_LINE, max_size=10))
def test_every_line_ends_up_with_exactly_one_field_and_keeps_its_bytes(lines: list[bytes]) -> None:
    """Each non-empty line keeps its bytes (bar a final \\r) and has a container field after."""
    chunk = b"\n".join(lines)
    tagged, count = add_container_field(chunk, "b" * 64)
    before = split_lines(chunk)
    after = split_lines(tagged)
    assert len(after) == len(before)
    field = b"|c:ci-" + b"b" * 64
    for old, new in zip(before, after, strict=True):
        if b"|c:" in old:
            assert new == old
        else:
            assert new == old + field
    assert count == sum(1 for line in before if b"|c:" not in line)
