"""Leader election on a Lease, with a fake API server that enforces resourceVersion like the real one.

tests/cluster/test_ha_leader.py runs two real operator processes against the real API server.
"""

from __future__ import annotations

import copy
from typing import Any

from phi3_operator.k8s import KubeApi, KubeError
from phi3_operator.leader import LeaderElector

PATH = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/phi3-operator"


class FakeLeases(KubeApi):
    def __init__(self) -> None:
        super().__init__(client=None)  # type: ignore[arg-type]
        self.lease: dict[str, Any] | None = None
        self.version = 0

    def _call(self, method: str, path: str, body: Any = None, query: Any = None,
              content_type: str = "application/json") -> Any:
        if method == "GET":
            if self.lease is None:
                raise KubeError(404, "NotFound", "no lease")
            return copy.deepcopy(self.lease)
        if method == "POST":
            assert path == PATH.rpartition("/")[0]
            if self.lease is not None:
                raise KubeError(409, "AlreadyExists", "lease exists")
        elif method == "PUT":
            assert path == PATH
            current = None if self.lease is None else self.lease["metadata"]["resourceVersion"]
            if current is None or body["metadata"].get("resourceVersion") != current:
                raise KubeError(409, "Conflict", "the object has been modified")
        else:
            raise AssertionError(method)
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.lease)

    @property
    def holder(self) -> str:
        assert self.lease is not None
        return str(self.lease["spec"]["holderIdentity"])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def elector(api: FakeLeases, identity: str, clock: Clock) -> LeaderElector:
    return LeaderElector(api, "ops", identity, lease_s=10, renew_deadline_s=8, retry_s=2, clock=clock)


def test_one_replica_holds_the_lease_and_the_other_waits_while_it_renews() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew() and api.holder == "a"
    for _ in range(10):  # 20 s of renewals: b never gets it
        clock.now += 2
        assert not b.try_acquire_or_renew()
        assert a.try_acquire_or_renew()
    assert api.holder == "a" and api.lease is not None and api.lease["spec"]["leaseTransitions"] == 0


def test_a_lease_not_renewed_for_its_duration_passes_to_the_standby() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # b starts its own count from when it first saw a's renewal
    clock.now += 9.9
    assert not b.try_acquire_or_renew(), "not expired yet by b's own clock"
    clock.now += 0.2
    assert b.try_acquire_or_renew() and api.holder == "b"
    assert api.lease is not None and api.lease["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew(), "the old leader cannot renew a lease it lost"


def test_two_standbys_racing_for_an_expired_lease_cannot_both_win() -> None:
    api, clock = FakeLeases(), Clock()
    a, b, c = elector(api, "a", clock), elector(api, "b", clock), elector(api, "c", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew() and not c.try_acquire_or_renew()
    clock.now += 11
    stale = copy.deepcopy(api.lease)
    assert b.try_acquire_or_renew()
    # c read the lease before b's write: its conditional write must fail on the resourceVersion.
    api_get = api._call
    api._call = lambda method, path, body=None, **kw: (  # type: ignore[method-assign]
        copy.deepcopy(stale) if method == "GET" else api_get(method, path, body, **kw))
    assert not c.try_acquire_or_renew()
    assert api.holder == "b"


def test_a_released_lease_is_taken_at_once() -> None:
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    a.release()
    assert api.holder == ""
    assert b.try_acquire_or_renew(), "no wait for expiry after a clean shutdown"


def test_renewing_that_fails_past_the_deadline_reports_the_loss_before_the_lease_expires() -> None:
    api, clock = FakeLeases(), Clock()
    a = LeaderElector(api, "ops", "a", lease_s=10, renew_deadline_s=8, retry_s=0.01, clock=clock)
    assert a.try_acquire_or_renew()
    lost: list[float] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise KubeError(503, "ServiceUnavailable", "apiserver restarting")

    api._call = refuse  # type: ignore[method-assign]
    clock.now += 8.5
    thread = a.renew_until_lost(on_lost=lambda: lost.append(clock.now))
    thread.join(5)
    assert lost == [108.5]
    assert lost[0] - 100.0 < a.lease_s, "the leader stops before any standby may take over"
