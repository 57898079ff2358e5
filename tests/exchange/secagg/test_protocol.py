"""The whole protocol among simulated sites in one process: the sum is exact, dropouts are
recovered, and every site refuses what would let the coordinator see more than the sum."""

from __future__ import annotations

import dataclasses
import json
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from agent.errors import SecAggError, SecAggRefused
from agent.exchange.secagg import (
    REASONS,
    AdvertiseBundle,
    ShareRequest,
    UnmaskRequest,
    UnmaskResponse,
    client,
    dequantize_sum,
    error_bound,
    generate_site_key,
)
from agent.exchange.secagg.primitives import sign
from agent.exchange.secagg.shamir import PRIME, Share
from tests.exchange.secagg.sim import RUN, Round, site_ids


def _refused(reason: str, call: object, *args: object) -> SecAggRefused:
    assert callable(call)
    with pytest.raises(SecAggRefused) as info:
        call(*args)
    assert info.value.reason == reason, str(info.value)
    return info.value


def test_all_sites_sum_exactly_and_decode_to_the_weighted_mean(tmp_path: Path) -> None:
    r = Round(tmp_path, n=5, threshold=3)
    total = r.run()
    ids = list(r.sites)
    assert np.array_equal(total, r.expected_sum(ids))
    decoded = dequantize_sum(total, r.params)
    w = sum(r.weights[s] for s in ids)
    assert decoded.total_weight == w
    exact = sum(r.weights[s] * np.clip(r.updates[s].astype(np.float64), -r.clip, r.clip) for s in ids) / w
    bound = error_bound(r.n, r.max_weight, r.clip, w)
    assert np.abs(decoded.mean - exact).max() <= bound
    assert {site.phase for site in r.sites.values()} == {"unmasked"}


def test_dropouts_before_and_after_the_masked_input_are_recovered(tmp_path: Path) -> None:
    r = Round(tmp_path, n=5, threshold=3)
    ids = list(r.sites)
    total = r.run(drop_before=[ids[1]], drop_after=[ids[3]])
    # ids[3] sent its masked input, so it is in the sum; ids[1] is not.
    contributors = [s for s in ids if s != ids[1]]
    assert np.array_equal(total, r.expected_sum(contributors))
    report = r.coordinator.report()
    assert report.dropped_after_mask == [ids[1]]
    assert ids[3] not in report.unmasked
    decoded = dequantize_sum(total, r.params)
    assert decoded.total_weight == sum(r.weights[s] for s in contributors)


def test_a_site_that_never_shares_is_left_out_of_the_masks(tmp_path: Path) -> None:
    r = Round(tmp_path, n=5, threshold=3)
    ids = list(r.sites)
    masks = r.share(r.advertise(), ids[:4])  # ids[4] advertised, then vanished
    unmask = r.mask(masks, ids[:4])
    assert np.array_equal(r.unmask(unmask, ids[:4]), r.expected_sum(ids[:4]))


def test_below_the_threshold_the_coordinator_and_every_site_stop(tmp_path: Path) -> None:
    r = Round(tmp_path, n=5, threshold=3)
    ids = list(r.sites)
    masks = r.share(r.advertise(), ids)
    with pytest.raises(SecAggError, match="below the threshold"):
        r.mask(masks, ids[:2])
    # A coordinator that asks anyway is refused by each survivor, which says why.
    request = UnmaskRequest(RUN, r.round_id, tuple(ids[:2]), tuple(ids[2:]))
    for s in ids[:2]:
        err = _refused("below_threshold", r.sites[s].unmask, request)
        assert "below the threshold 3" in str(err)
        assert r.sites[s].refusal is not None
    # Too few unmask answers: the sum stays masked.
    r2 = Round(tmp_path / "again", n=5, threshold=3, round_id="round-2")
    masks = r2.share(r2.advertise(), ids)
    unmask = r2.mask(masks, ids)
    with pytest.raises(SecAggError, match="stays masked"):
        r2.unmask(unmask, ids[:2])


@pytest.mark.parametrize("how", ["unsigned", "signed_by_wrong_key"])
def test_a_swapped_public_key_is_refused_by_every_site(tmp_path: Path, how: str) -> None:
    r = Round(tmp_path, n=3, threshold=2)
    request = r.advertise()
    victim = request.bundles[1]
    forged = dataclasses.replace(victim, s_pk=bytes(range(32)), c_pk=bytes(range(32, 64)))
    if how == "unsigned":
        forged = dataclasses.replace(forged, signature=bytes(64))
    else:
        forged = dataclasses.replace(forged, signature=sign(generate_site_key(), forged.signed_bytes()))
    swapped = ShareRequest(RUN, r.round_id, tuple(forged if b is victim else b for b in request.bundles))
    for s, site in r.sites.items():
        # The victim too: its own entry no longer verifies (checked before "is it mine").
        err = _refused("bad_signature", site.share, swapped)
        assert victim.site_id in str(err)
        assert site.phase == "refused"
        assert not (site.directory / "secrets.json").exists()
        # Refused for good: the honest set is refused too, afterwards.
        _refused("refused_earlier", site.share, request)
    # The coordinator's own check against the pinned keys catches it as well.
    with pytest.raises(SecAggError, match="not signed by its pinned key"):
        Round(tmp_path / "c", n=3, threshold=2).coordinator.add_advertisement(forged)


def test_a_site_outside_the_roster_or_listed_twice_is_refused(tmp_path: Path) -> None:
    r = Round(tmp_path, n=3, threshold=2)
    request = r.advertise()
    stranger_key = generate_site_key()
    stranger = AdvertiseBundle("site-zz", RUN, r.round_id, bytes(32), bytes([1]) * 32, b"")
    stranger = dataclasses.replace(stranger, signature=sign(stranger_key, stranger.signed_bytes()))
    s0, s1, s2 = site_ids(3)
    _refused("unknown_site", r.sites[s0].share, ShareRequest(RUN, r.round_id, (*request.bundles, stranger)))
    _refused(
        "duplicate_site",
        r.sites[s1].share,
        ShareRequest(RUN, r.round_id, (*request.bundles, request.bundles[0])),
    )
    _refused("own_bundle_missing", r.sites[s2].share, ShareRequest(RUN, r.round_id, request.bundles[:2]))


def test_a_bundle_replayed_from_another_round_is_refused(tmp_path: Path) -> None:
    old = Round(tmp_path / "old", n=3, threshold=2, round_id="round-0")
    old_request = old.advertise()
    r = Round(tmp_path / "new", n=3, threshold=2, keys=old.keys)
    request = r.advertise()
    mixed = ShareRequest(RUN, r.round_id, (request.bundles[0], old_request.bundles[1], request.bundles[2]))
    _refused("wrong_context", r.sites[site_ids(3)[0]].share, mixed)


def test_the_site_minimums_and_the_majority_rule(tmp_path: Path) -> None:
    r = Round(tmp_path, n=4, threshold=3)
    request = r.advertise()
    roster = {s: k.public_key() for s, k in r.keys.items()}
    ids = site_ids(4)
    # Reopening the same directory with stricter minimums: the state carries over.
    strict = r.site(ids[0], roster, min_threshold=4)
    _refused("threshold_below_minimum", strict.share, request)
    _refused("too_few_sites", r.site(ids[1], roster, min_sites=5).share, request)
    weak = Round(tmp_path / "weak", n=4, threshold=2)
    _refused("threshold_not_majority", weak.sites[ids[0]].share, weak.advertise())
    big = Round(tmp_path / "big", n=3, threshold=4)
    bundles = tuple(site.advertise() for site in big.sites.values())
    _refused("below_threshold", big.sites[site_ids(3)[0]].share, ShareRequest(RUN, "round-1", bundles))


def test_asking_both_shares_of_one_peer_is_refused_and_recorded(tmp_path: Path) -> None:
    r = Round(tmp_path, n=5, threshold=3)
    ids = list(r.sites)
    unmask = r.mask(r.share(r.advertise(), ids), ids)
    both = UnmaskRequest(RUN, r.round_id, tuple(ids), (ids[2],))
    err = _refused("both_shares", r.sites[ids[0]].unmask, both)
    assert ids[2] in str(err)
    state = json.loads((r.sites[ids[0]].directory / "state.json").read_text())
    assert state["phase"] == "refused" and state["refusal"]["reason"] == "both_shares"
    # Having refused, the site does not answer the honest request either.
    _refused("refused_earlier", r.sites[ids[0]].unmask, unmask)
    # Other inconsistent sets.
    _refused("inconsistent_sets", r.sites[ids[1]].unmask, UnmaskRequest(RUN, r.round_id, tuple(ids[:4]), ()))
    _refused(
        "not_a_member", r.sites[ids[2]].unmask, UnmaskRequest(RUN, r.round_id, tuple(ids[3:]), tuple(ids[:3]))
    )
    _refused("not_a_subset", r.sites[ids[3]].unmask, UnmaskRequest(RUN, r.round_id, (*ids, "site-99"), ()))


def test_unmask_answers_one_request_and_its_retries_only(tmp_path: Path) -> None:
    r = Round(tmp_path, n=3, threshold=2)
    ids = list(r.sites)
    unmask = r.mask(r.share(r.advertise(), ids), ids)
    site = r.sites[ids[0]]
    first = site.unmask(unmask)
    assert not (site.directory / "secrets.json").exists()
    # The same request again (a retry after a lost response) gets the same shares, from the
    # kept answer: the secrets are gone.
    assert site.unmask(unmask) == first
    assert site.unmask(UnmaskRequest(RUN, r.round_id, tuple(reversed(ids)), ())) == first
    answer = site.directory / "unmask.json"
    assert answer.stat().st_mode & 0o777 == 0o600
    # Any other survivor set is refused, and the round stays answered.
    other = UnmaskRequest(RUN, r.round_id, tuple(ids[:2]), (ids[2],))
    err = _refused("second_unmask", site.unmask, other)
    assert f"survivors {', '.join(sorted(ids))} and dropped none" in str(err)
    _refused("second_unmask", site.unmask, UnmaskRequest(RUN, "round-2", tuple(ids), ()))
    assert site.phase == "unmasked"
    assert site.unmask(unmask) == first
    # Without its kept answer (a site upgraded mid-round), even the same request is refused.
    answer.unlink()
    _refused("second_unmask", site.unmask, unmask)


def test_retries_get_the_same_answer_and_other_inputs_are_refused(tmp_path: Path) -> None:
    r = Round(tmp_path, n=3, threshold=2)
    ids = list(r.sites)
    site = r.sites[ids[0]]
    assert site.advertise() == site.advertise()
    request = r.advertise()
    first = site.share(request)
    assert site.share(request) == first
    for s in ids[1:]:
        r.coordinator.add_shares(r.sites[s].share(request))
    r.coordinator.add_shares(first)
    masks = r.coordinator.mask_requests()
    vector = np.arange(r.length + 1, dtype=np.uint32)
    masked = site.mask(masks[ids[0]], vector)
    assert np.array_equal(site.mask(masks[ids[0]], vector), masked)
    assert not np.array_equal(masked, vector)
    _refused("second_mask", site.mask, masks[ids[0]], vector + np.uint32(1))


def test_state_is_private_and_survives_a_restart(tmp_path: Path) -> None:
    r = Round(tmp_path, n=3, threshold=2)
    ids = list(r.sites)
    masks = r.share(r.advertise(), ids)
    roster = {s: k.public_key() for s, k in r.keys.items()}
    # A new object on the same directory (the agent restarted) carries on.
    r.sites[ids[0]] = r.site(ids[0], roster)
    unmask = r.mask(masks, ids)
    for s in ids:
        directory = r.sites[s].directory
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for f in directory.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert np.array_equal(r.unmask(unmask, ids), r.expected_sum(ids))
    with pytest.raises(SecAggError, match="holds the state of"):
        Round(tmp_path, n=3, threshold=3, keys=r.keys)


def test_a_tampered_share_ciphertext_is_refused(tmp_path: Path) -> None:
    r = Round(tmp_path, n=3, threshold=2)
    ids = list(r.sites)
    masks = r.share(r.advertise(), ids)
    request = masks[ids[0]]
    sender = ids[1]
    bad = bytearray(request.ciphertexts[sender])
    bad[-1] ^= 1
    tampered = dataclasses.replace(request, ciphertexts={**request.ciphertexts, sender: bytes(bad)})
    _refused("bad_ciphertext", r.sites[ids[0]].mask, tampered, np.zeros(r.length + 1, dtype=np.uint32))
    # A ciphertext for another recipient, rerouted: it does not authenticate here.
    rerouted = dataclasses.replace(
        masks[ids[2]], ciphertexts={**masks[ids[2]].ciphertexts, ids[1]: request.ciphertexts[ids[1]]}
    )
    _refused("bad_ciphertext", r.sites[ids[2]].mask, rerouted, np.zeros(r.length + 1, dtype=np.uint32))
    missing = dataclasses.replace(masks[ids[1]], ciphertexts={})
    _refused("missing_ciphertext", r.sites[ids[1]].mask, missing, np.zeros(r.length + 1, dtype=np.uint32))


def test_steps_out_of_order_are_refused(tmp_path: Path) -> None:
    r = Round(tmp_path, n=3, threshold=2)
    ids = list(r.sites)
    unmask = UnmaskRequest(RUN, r.round_id, tuple(ids), ())
    _refused("out_of_order", r.sites[ids[0]].unmask, unmask)
    request = ShareRequest(RUN, r.round_id, ())
    _refused("out_of_order", r.sites[ids[1]].share, request)


def test_the_coordinator_refuses_what_does_not_fit_the_round(tmp_path: Path) -> None:
    r = Round(tmp_path, n=3, threshold=2)
    ids = list(r.sites)
    request = r.advertise()
    with pytest.raises(SecAggError, match="after the advertised set was closed"):
        r.coordinator.add_advertisement(request.bundles[0])
    masks = r.share(request, ids)
    with pytest.raises(SecAggError, match="expected uint32"):
        r.coordinator.add_masked(ids[0], np.zeros(r.length, dtype=np.uint32))
    r.coordinator.add_masked(ids[0], np.zeros(r.length + 1, dtype=np.uint32))
    with pytest.raises(SecAggError, match="second masked input"):
        r.coordinator.add_masked(ids[0], np.zeros(r.length + 1, dtype=np.uint32))
    assert set(masks) == set(ids)


def test_every_reason_a_site_gives_is_documented() -> None:
    """The reason codes in the site's refusals are exactly those `REASONS` explains (audit, docs)."""
    source = Path(client.__file__).read_text()
    used = set(re.findall(r'_refuse\(\s*state,\s*"(\w+)"', source)) | set(
        re.findall(r'SecAggRefused\(\s*"(\w+)"', source)
    )
    assert used == set(REASONS)


def test_the_coordinator_keeps_only_the_running_sum_of_masked_inputs(tmp_path: Path) -> None:
    r = Round(tmp_path, n=3, threshold=2)
    ids = list(r.sites)
    masks = r.share(r.advertise(), ids)
    vector = np.arange(r.length + 1, dtype=np.uint32)
    masked = [r.sites[s].mask(masks[s], vector) for s in ids[:2]]
    for s, m in zip(ids[:2], masked, strict=True):
        r.coordinator.add_masked(s, m)
    arrays = [v for v in vars(r.coordinator).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1 and np.array_equal(arrays[0], masked[0] + masked[1])


def _with_bad_share(response: UnmaskResponse, kind: str, v: str) -> UnmaskResponse:
    shares = dict(getattr(response, kind))
    good = Share.from_bytes(shares[v])
    shares[v] = Share(good.x, (good.y + 1) % PRIME).to_bytes()
    if kind == "b_shares":
        return dataclasses.replace(response, b_shares=shares)
    return dataclasses.replace(response, s_shares=shares)


@pytest.mark.parametrize("kind", ["b_shares", "s_shares"])
def test_one_wrong_share_is_outvoted_when_there_are_spare_answers(tmp_path: Path, kind: str) -> None:
    """A seed needs t + 2 answers to single out the wrong one; a mask key t + 1, since the key it
    rebuilds must match the dropped site's advertised public key."""
    r = Round(tmp_path, n=5, threshold=3)
    ids = list(r.sites)
    # For s-shares, ids[4] drops before its masked input; 4 answers remain.
    contributors = ids if kind == "b_shares" else ids[:4]
    unmask = r.mask(r.share(r.advertise(), ids), contributors)
    target = ids[0] if kind == "b_shares" else ids[4]
    liar = ids[2]
    for s in unmask.survivors:
        answer = r.sites[s].unmask(unmask)
        r.coordinator.add_unmask(_with_bad_share(answer, kind, target) if s == liar else answer)
    assert np.array_equal(r.coordinator.result(), r.expected_sum(contributors))
    assert r.coordinator.report().bad_shares == [liar]


def test_a_wrong_share_without_spare_answers_stops_the_round(tmp_path: Path) -> None:
    r = Round(tmp_path, n=5, threshold=3)
    ids = list(r.sites)
    unmask = r.mask(r.share(r.advertise(), ids), ids)
    for s in ids[:4]:  # t + 1 answers: one wrong b-share cannot be told from the rest
        answer = r.sites[s].unmask(unmask)
        r.coordinator.add_unmask(_with_bad_share(answer, "b_shares", ids[1]) if s == ids[0] else answer)
    with pytest.raises(SecAggError, match=f"self-mask seed of {ids[1]} do not agree"):
        r.coordinator.result()
