"""The site's side of one secure-aggregation round: a state machine that refuses to be misused.

One `SiteSecAgg` per round, persisted in a directory the caller owns (the agent's work dir
``secagg/<round_id>/``) as 0600 files, so that the API process and a restarted agent see the
same state and a site answers each step once. Phases::

    new --advertise--> advertised --share--> shared --mask--> masked --unmask--> unmasked
                 (any refusal before unmask) --> refused (terminal; secrets deleted)

Each step may be asked again with the *same* input (an HTTP retry) and gives the same answer;
asked with a different input it is refused. Unmasking answers one request, ever: the answer is
kept (0600, ``unmask.json``) so that the same request again, a coordinator's retry after a lost
response, gets it again, while any other survivor set is refused. Every refusal raises
`SecAggRefused` with a reason code from `REASONS`, and (except a second unmask, which leaves the
answered round as it was) ends the round for this site: a coordinator that tried a forbidden
step once gets nothing more. After unmasking, or a refusal, the round's secrets are deleted
from the disk.

What the site checks (against its own roster, never the coordinator's word):

* share: every bundle is signed by the roster key of the site it names; its own bundle is in
  the set, unchanged; no site twice; the run and round are this round's; the number of sites
  |U1| reaches the threshold t and the site's minimum number of sites; t reaches the site's
  minimum threshold, and t is a strict majority of U1 (2t > |U1|: then no coordinator can
  collect t shares of the self-mask seed and t shares of the mask key of the same site from
  disjoint sets of honest sites, each of which answers once);
* mask: U2 is a subset of U1 with at least t sites, this site among them; a ciphertext from
  every other site of U2 that authenticates for this run, round, sender and recipient;
* unmask: survivors U3 and dropped D partition U2, no site in both, |U3| >= t, this site in U3.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import SecAggError, SecAggRefused
from agent.exchange.secagg import primitives as P
from agent.exchange.secagg.messages import (
    AdvertiseBundle,
    MaskRequest,
    ShareRequest,
    ShareResponse,
    UnmaskRequest,
    UnmaskResponse,
    check_run_id,
    check_site_id,
    context,
)
from agent.exchange.secagg.shamir import Share, split

# Every reason code a site gives when it refuses, and what it means (for the audit log and docs).
REASONS: dict[str, str] = {
    "refused_earlier": "this site already refused this round; it takes no further step",
    "out_of_order": "the step was asked before the step it depends on",
    "wrong_context": "the message names another run or round",
    "unknown_site": "a bundle names a site that is not in this site's roster",
    "bad_signature": "a bundle's signature does not verify under the roster key of the site it names",
    "own_bundle_missing": "this site's own bundle is not among the bundles",
    "own_bundle_altered": "this site's own bundle came back different from what it sent",
    "duplicate_site": "a site appears twice among the bundles",
    "duplicate_key": "two sites advertise the same public key",
    "below_threshold": "fewer sites than the round's threshold",
    "threshold_below_minimum": "the round's threshold is below the site's configured minimum",
    "too_few_sites": "fewer sites than the site's configured minimum",
    "threshold_not_majority": "the threshold is not a strict majority of the round's sites",
    "bundles_changed": "the bundles differ from those this site already answered",
    "not_a_member": "this site is not in the set it is asked to act on",
    "not_a_subset": "a set names sites that the previous step did not have",
    "missing_ciphertext": "a share ciphertext from a site of U2 is missing",
    "bad_ciphertext": "a share ciphertext does not authenticate or does not hold this site's shares",
    "second_mask": "a masked input was asked again with other survivors or another update",
    "both_shares": "a site is listed both as survivor and as dropped (both of its shares asked)",
    "inconsistent_sets": "survivors and dropped do not together make up U2",
    "second_unmask": "this site already answered the unmasking of this round",
}

_STATE = "state.json"
_SECRETS = "secrets.json"
_UNMASK_ANSWER = "unmask.json"
_LOCK = ".lock"
_PHASES = ("new", "advertised", "shared", "masked", "unmasked", "refused")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic write as a 0600 file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SecAggError(f"{path}: cannot read the secure-aggregation state: {exc}") from None
    if not isinstance(data, dict):
        raise SecAggError(f"{path}: the secure-aggregation state is not a JSON object")
    return data


def _sign_of(u: str, v: str) -> int:
    """+1 when u sorts before v: the pairwise masks of u and v then cancel in the sum."""
    return 1 if u < v else -1


def share_key_context(run_id: str, round_id: str, sender: str, recipient: str) -> bytes:
    """HKDF info and AES-GCM associated data of the shares SENDER seals for RECIPIENT."""
    return context("share", run_id, round_id, sender, recipient)


def mask_seed_context(run_id: str, round_id: str, u: str, v: str) -> bytes:
    """HKDF info of the pairwise mask seed of u and v (the same for both: ids in sorted order)."""
    a, b = sorted((u, v))
    return context("mask", run_id, round_id, a, b)


def input_digest(vector: np.ndarray) -> str:
    """SHA-256 of a quantised vector's bytes: what a repeated mask request is compared on."""
    return hashlib.sha256(np.ascontiguousarray(vector, dtype="<u4").tobytes()).hexdigest()


class SiteSecAgg:
    """One site's secure-aggregation state for one round (see the module docstring).

    ``roster`` maps every site id this site accepts to its pinned Ed25519 public key (the site's
    config, never the coordinator); it may include this site (then its key must match
    ``signing_key``). ``threshold`` is the round's (the plan's). ``min_threshold`` and
    ``min_sites`` are the site's own minimums (its config). Construction creates DIRECTORY
    (0700) or reopens the state already there; reopening with other parameters is an error.
    """

    def __init__(
        self,
        directory: Path,
        *,
        site_id: str,
        run_id: str,
        round_id: str,
        threshold: int,
        signing_key: Ed25519PrivateKey,
        roster: Mapping[str, Ed25519PublicKey],
        min_threshold: int = 1,
        min_sites: int = 1,
    ) -> None:
        self.site_id = check_site_id(site_id, "site_id")
        self.run_id = check_run_id(run_id, "run_id")
        self.round_id = check_run_id(round_id, "round_id")
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
            raise SecAggError(f"threshold must be a positive integer, got {threshold!r}")
        self.threshold = threshold
        self.min_threshold = min_threshold
        self.min_sites = min_sites
        self._key = signing_key
        self.roster = dict(roster)
        for name in self.roster:
            check_site_id(name, "roster key")
        own = self.roster.get(self.site_id)
        if own is not None and P.public_key_b64(own) != P.public_key_b64(signing_key):
            raise SecAggError(
                f"the roster's key for this site ({self.site_id}) is not the public key "
                "of the site signing key"
            )
        self.roster[self.site_id] = signing_key.public_key()
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        identity = {
            "site_id": self.site_id,
            "run_id": self.run_id,
            "round_id": self.round_id,
            "threshold": threshold,
        }
        with self._locked():
            path = self.directory / _STATE
            if path.exists():
                state = _read_json(path)
                stored = {k: state.get(k) for k in identity}
                if stored != identity:
                    raise SecAggError(f"{self.directory}: holds the state of {stored}, not of {identity}")
            else:
                _write_json(path, {**identity, "phase": "new"})

    # ------------------------------------------------------------------ state on disk

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One step at a time across processes (the API's threads, a CLI, a restarted agent)."""
        fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _state(self) -> dict[str, Any]:
        return _read_json(self.directory / _STATE)

    def _save(self, state: Mapping[str, Any]) -> None:
        _write_json(self.directory / _STATE, state)

    def _secrets(self) -> dict[str, Any]:
        return _read_json(self.directory / _SECRETS)

    def _save_secrets(self, data: Mapping[str, Any]) -> None:
        _write_json(self.directory / _SECRETS, data)

    def _wipe_secrets(self) -> None:
        (self.directory / _SECRETS).unlink(missing_ok=True)

    def _refuse(
        self, state: dict[str, Any], reason: str, message: str, *, terminal: bool = True
    ) -> SecAggRefused:
        """Record the refusal (terminal: phase refused, secrets deleted) and return the exception."""
        if terminal and state.get("phase") not in ("refused", "unmasked"):
            state["phase"] = "refused"
            state["refusal"] = {"reason": reason, "message": message}
            self._save(state)
            self._wipe_secrets()
        return SecAggRefused(reason, message)

    def _check_open(self, state: dict[str, Any]) -> None:
        if state["phase"] == "refused":
            earlier = state.get("refusal") or {}
            raise SecAggRefused(
                "refused_earlier",
                f"this site refused round {self.round_id} earlier "
                f"({earlier.get('reason')}: {earlier.get('message')})",
            )

    def _check_context(self, state: dict[str, Any], run_id: str, round_id: str) -> None:
        if (run_id, round_id) != (self.run_id, self.round_id):
            raise self._refuse(
                state,
                "wrong_context",
                f"message for run {run_id!r} round {round_id!r}, "
                f"this is run {self.run_id!r} round {self.round_id!r}",
            )

    @property
    def phase(self) -> str:
        """new, advertised, shared, masked, unmasked or refused."""
        with self._locked():
            return str(self._state()["phase"])

    @property
    def refusal(self) -> tuple[str, str] | None:
        """(reason, message) of the refusal that ended this round, or None."""
        with self._locked():
            found = self._state().get("refusal")
        return (str(found["reason"]), str(found["message"])) if found else None

    @property
    def sites(self) -> tuple[str, ...]:
        """U1, the round's advertised sites (sorted), once this site has shared; () before."""
        with self._locked():
            return tuple(b["site_id"] for b in self._state().get("bundles", []))

    # ------------------------------------------------------------------ step 0

    def advertise(self) -> AdvertiseBundle:
        """Make this round's two X25519 key pairs and return them signed (the same bundle if asked again)."""
        with self._locked():
            state = self._state()
            self._check_open(state)
            if state["phase"] != "new":
                return AdvertiseBundle.from_dict(state["bundle"])
            c_sk, c_pk = P.x25519_keypair()
            s_sk, s_pk = P.x25519_keypair()
            unsigned = AdvertiseBundle(self.site_id, self.run_id, self.round_id, c_pk, s_pk, b"")
            bundle = AdvertiseBundle(
                self.site_id,
                self.run_id,
                self.round_id,
                c_pk,
                s_pk,
                P.sign(self._key, unsigned.signed_bytes()),
            )
            self._save_secrets({"c_sk": P.b64e(c_sk), "s_sk": P.b64e(s_sk)})
            state.update(phase="advertised", bundle=bundle.to_dict())
            self._save(state)
            return bundle

    # ------------------------------------------------------------------ step 1

    def share(self, request: ShareRequest) -> ShareResponse:
        """Check U1's bundles, then seal t-of-|U1| shares of this site's secrets for every other site."""
        with self._locked():
            state = self._state()
            self._check_open(state)
            given = [b.to_dict() for b in request.bundles]
            if state["phase"] in ("shared", "masked", "unmasked"):
                if sorted(given, key=lambda b: b["site_id"]) == state["bundles"]:
                    return ShareResponse.from_dict(state["share_response"])
                raise self._refuse(state, "bundles_changed", "asked to share again with other bundles")
            if state["phase"] != "advertised":
                raise self._refuse(
                    state, "out_of_order", "asked for shares before this site advertised its keys"
                )
            self._check_context(state, request.run_id, request.round_id)
            bundles = self._verify_bundles(state, request.bundles)
            n = len(bundles)
            t = self.threshold
            if t < self.min_threshold:
                raise self._refuse(
                    state,
                    "threshold_below_minimum",
                    f"threshold {t} is below this site's minimum {self.min_threshold}",
                )
            if n < self.min_sites:
                raise self._refuse(
                    state, "too_few_sites", f"{n} sites, below this site's minimum {self.min_sites}"
                )
            if n < t:
                raise self._refuse(
                    state, "below_threshold", f"{n} sites advertised keys, below the threshold {t}"
                )
            if 2 * t <= n:
                raise self._refuse(
                    state,
                    "threshold_not_majority",
                    f"threshold {t} is not a strict majority of {n} sites (needs at least {n // 2 + 1})",
                )
            keys = self._secrets()
            s_sk = P.b64d(keys["s_sk"], field="s_sk", size=P.KEY_BYTES)
            c_sk = P.b64d(keys["c_sk"], field="c_sk", size=P.KEY_BYTES)
            b_seed = secrets.token_bytes(P.KEY_BYTES)
            ids = [b.site_id for b in bundles]
            xs = {site: i + 1 for i, site in enumerate(ids)}
            b_shares = split(b_seed, t, list(xs.values()))
            s_shares = split(s_sk, t, list(xs.values()))
            sealed: dict[str, bytes] = {}
            for bundle in bundles:
                v = bundle.site_id
                if v == self.site_id:
                    continue
                ctx = share_key_context(self.run_id, self.round_id, self.site_id, v)
                key = P.agree(c_sk, bundle.c_pk, ctx)
                sealed[v] = P.seal(key, b_shares[xs[v]].to_bytes() + s_shares[xs[v]].to_bytes(), ctx)
            response = ShareResponse(self.site_id, self.run_id, self.round_id, sealed)
            own = xs[self.site_id]
            keys.update(
                b=P.b64e(b_seed),
                own_b_share=P.b64e(b_shares[own].to_bytes()),
                own_s_share=P.b64e(s_shares[own].to_bytes()),
            )
            self._save_secrets(keys)
            state.update(
                phase="shared", bundles=[b.to_dict() for b in bundles], share_response=response.to_dict()
            )
            self._save(state)
            return response

    def _verify_bundles(
        self, state: dict[str, Any], given: tuple[AdvertiseBundle, ...]
    ) -> list[AdvertiseBundle]:
        seen: set[str] = set()
        pks: set[bytes] = set()
        for bundle in given:
            if bundle.site_id in seen:
                raise self._refuse(
                    state, "duplicate_site", f"site {bundle.site_id} appears twice among the bundles"
                )
            seen.add(bundle.site_id)
            if (bundle.run_id, bundle.round_id) != (self.run_id, self.round_id):
                raise self._refuse(
                    state,
                    "wrong_context",
                    f"the bundle of {bundle.site_id} is for run {bundle.run_id!r} round {bundle.round_id!r}",
                )
            pinned = self.roster.get(bundle.site_id)
            if pinned is None:
                raise self._refuse(
                    state, "unknown_site", f"site {bundle.site_id} is not in this site's roster"
                )
            if not P.verify(pinned, bundle.signature, bundle.signed_bytes()):
                raise self._refuse(
                    state,
                    "bad_signature",
                    f"the keys of site {bundle.site_id} are not signed by its pinned key "
                    "(substituted or altered)",
                )
            for pk in (bundle.c_pk, bundle.s_pk):
                if pk in pks:
                    raise self._refuse(
                        state, "duplicate_key", f"site {bundle.site_id} advertises a key another site has"
                    )
                pks.add(pk)
        if self.site_id not in seen:
            raise self._refuse(
                state, "own_bundle_missing", f"this site's ({self.site_id}) bundle is not among them"
            )
        own = next(b for b in given if b.site_id == self.site_id)
        if own.to_dict() != state["bundle"]:
            raise self._refuse(state, "own_bundle_altered", "this site's bundle is not the one it advertised")
        return sorted(given, key=lambda b: b.site_id)

    # ------------------------------------------------------------------ step 2

    def mask(self, request: MaskRequest, vector: np.ndarray) -> np.ndarray:
        """The masked input: VECTOR (quantised, uint32) + PRG(b_u) + signed pairwise masks with U2,
        modulo 2^32."""
        arr = np.asarray(vector)
        if arr.dtype != np.uint32 or arr.ndim != 1 or arr.size == 0:
            raise SecAggError(f"the vector to mask must be non-empty 1-D uint32, got {arr.dtype} {arr.shape}")
        with self._locked():
            state = self._state()
            self._check_open(state)
            digest = input_digest(arr)
            if state["phase"] in ("masked", "unmasked"):
                if list(request.survivors) != state["survivors"] or digest != state["input_sha256"]:
                    raise self._refuse(
                        state,
                        "second_mask",
                        "a masked input was already given for other survivors or another update",
                    )
                if state["phase"] == "unmasked":
                    raise self._refuse(state, "second_unmask", "this round is unmasked; its secrets are gone")
                return self._masked(state, self._secrets(), arr, request.survivors)
            if state["phase"] != "shared":
                raise self._refuse(
                    state, "out_of_order", "asked for a masked input before this site shared its keys"
                )
            self._check_context(state, request.run_id, request.round_id)
            u1 = [b["site_id"] for b in state["bundles"]]
            u2 = list(request.survivors)
            if self.site_id not in u2:
                raise self._refuse(
                    state, "not_a_member", f"this site ({self.site_id}) is not among the survivors"
                )
            extra = sorted(set(u2) - set(u1))
            if extra:
                raise self._refuse(
                    state, "not_a_subset", f"survivors not among the advertised sites: {', '.join(extra)}"
                )
            if len(u2) < self.threshold:
                raise self._refuse(
                    state,
                    "below_threshold",
                    f"{len(u2)} sites shared their keys, below the threshold {self.threshold}",
                )
            expected = set(u2) - {self.site_id}
            missing = sorted(expected - set(request.ciphertexts))
            if missing:
                raise self._refuse(state, "missing_ciphertext", f"no shares from {', '.join(missing)}")
            unexpected = sorted(set(request.ciphertexts) - expected)
            if unexpected:
                raise self._refuse(
                    state,
                    "not_a_subset",
                    f"shares from sites not among the survivors: {', '.join(unexpected)}",
                )
            keys = self._secrets()
            c_sk = P.b64d(keys["c_sk"], field="c_sk", size=P.KEY_BYTES)
            x_own = u1.index(self.site_id) + 1
            by_id = {b["site_id"]: AdvertiseBundle.from_dict(b) for b in state["bundles"]}
            received: dict[str, dict[str, str]] = {}
            for v in sorted(expected):
                ctx = share_key_context(self.run_id, self.round_id, v, self.site_id)
                try:
                    plain = P.open_sealed(P.agree(c_sk, by_id[v].c_pk, ctx), request.ciphertexts[v], ctx)
                    b_share = Share.from_bytes(plain[: len(plain) // 2])
                    s_share = Share.from_bytes(plain[len(plain) // 2 :])
                except SecAggError as exc:
                    raise self._refuse(state, "bad_ciphertext", f"the shares from {v}: {exc}") from None
                if b_share.x != x_own or s_share.x != x_own:
                    raise self._refuse(
                        state, "bad_ciphertext", f"the shares from {v} are not this site's (x={b_share.x})"
                    )
                received[v] = {"b": P.b64e(b_share.to_bytes()), "s": P.b64e(s_share.to_bytes())}
            keys["peer_shares"] = received
            self._save_secrets(keys)
            masked = self._masked(state, keys, arr, request.survivors)
            state.update(phase="masked", survivors=u2, input_sha256=digest, length=int(arr.shape[0]))
            self._save(state)
            return masked

    def _masked(
        self, state: Mapping[str, Any], keys: Mapping[str, Any], arr: np.ndarray, u2: tuple[str, ...]
    ) -> np.ndarray:
        s_sk = P.b64d(keys["s_sk"], field="s_sk", size=P.KEY_BYTES)
        out = arr.astype(np.uint32, copy=True)
        P.add_prg(out, P.b64d(keys["b"], field="b", size=P.KEY_BYTES))
        s_pks = {b["site_id"]: P.b64d(b["s_pk"], field="s_pk", size=P.KEY_BYTES) for b in state["bundles"]}
        for v in u2:
            if v == self.site_id:
                continue
            seed = P.agree(s_sk, s_pks[v], mask_seed_context(self.run_id, self.round_id, self.site_id, v))
            P.add_prg(out, seed, _sign_of(self.site_id, v))
        return out

    # ------------------------------------------------------------------ step 3

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Once per round: b-shares of the survivors U3, s-shares of the dropped U2 \\ U3."""
        with self._locked():
            state = self._state()
            self._check_open(state)
            if state["phase"] == "unmasked":
                answered = state.get("unmask") or {}
                same = (
                    (request.run_id, request.round_id) == (self.run_id, self.round_id)
                    and sorted(set(request.survivors)) == answered.get("survivors")
                    and sorted(set(request.dropped)) == answered.get("dropped")
                )
                answer = self.directory / _UNMASK_ANSWER
                if same and answer.is_file():
                    # A retry of the request answered (its response lost on the way): the
                    # same shares again reveal nothing the first answer did not.
                    return UnmaskResponse.from_dict(_read_json(answer))
                raise self._refuse(
                    state,
                    "second_unmask",
                    f"this site already answered the unmasking of round {self.round_id} for survivors "
                    f"{', '.join(answered.get('survivors', []))} and dropped "
                    f"{', '.join(answered.get('dropped', [])) or 'none'}; it answers only that request again",
                    terminal=False,
                )
            if state["phase"] != "masked":
                raise self._refuse(
                    state, "out_of_order", "asked to unmask before this site gave its masked input"
                )
            self._check_context(state, request.run_id, request.round_id)
            u2 = set(state["survivors"])
            u3, dropped = set(request.survivors), set(request.dropped)
            both = sorted(u3 & dropped)
            if both:
                raise self._refuse(
                    state,
                    "both_shares",
                    f"{', '.join(both)} listed both as survivor and as dropped: "
                    "this site never reveals both shares of a peer",
                )
            if self.site_id not in u3:
                raise self._refuse(
                    state, "not_a_member", f"this site ({self.site_id}) is not among the survivors"
                )
            outside = sorted((u3 | dropped) - u2)
            if outside:
                raise self._refuse(
                    state, "not_a_subset", f"sites that did not share in this round: {', '.join(outside)}"
                )
            if (u3 | dropped) != u2:
                unnamed = sorted(u2 - u3 - dropped)
                raise self._refuse(
                    state,
                    "inconsistent_sets",
                    f"sites of U2 neither survivor nor dropped: {', '.join(unnamed)}",
                )
            if len(u3) < self.threshold:
                raise self._refuse(
                    state,
                    "below_threshold",
                    f"{len(u3)} survivors, below the threshold {self.threshold}: "
                    "this site will not help unmask",
                )
            keys = self._secrets()
            peers: dict[str, dict[str, str]] = keys.get("peer_shares", {})
            b_out: dict[str, bytes] = {}
            s_out: dict[str, bytes] = {}
            for v in sorted(u3):
                text = keys["own_b_share"] if v == self.site_id else peers[v]["b"]
                b_out[v] = P.b64d(text, field="b share")
            for v in sorted(dropped):
                s_out[v] = P.b64d(peers[v]["s"], field="s share")
            response = UnmaskResponse(self.site_id, self.run_id, self.round_id, b_out, s_out)
            # The answer before the phase: a crash between the two leaves the round masked, and
            # the same request is answered from the secrets again.
            _write_json(self.directory / _UNMASK_ANSWER, response.to_dict())
            state.update(phase="unmasked", unmask={"survivors": sorted(u3), "dropped": sorted(dropped)})
            self._save(state)
            self._wipe_secrets()
            return response

    def wipe(self) -> None:
        """Delete this round's secrets (an abandoned round); the public state stays for the record."""
        with self._locked():
            self._wipe_secrets()
