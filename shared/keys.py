"""Every Redis key and object-store key fleettune uses, in one place.

Redis (all under the `ft:` prefix; nothing expires unless noted):
    ft:fed:{fed}:config          JSON FederationConfig in force (its `revision` field numbers it)
    ft:fed:{fed}:config:{rev}    JSON FederationConfig of each revision (rounds name theirs: immutable)
    ft:fed:{fed}:config:pending  JSON FederationConfig that takes effect when the next round opens
    ft:fed:{fed}:state           hash: status, round, version, reason, server_lr (guard override)
    ft:fed:{fed}:devices         set of enrolled device ids (those the device filter admitted)
    ft:fed:{fed}:profiles        hash device_id -> msgpack DeviceProfile (RAM, storage, tier)
    ft:fed:{fed}:async_bases     hash device_id -> newest base version it has an accepted async update from
    ft:fed:{fed}:async_joined    hash device_id -> base version of the last buffer its update joined
                                 (its next update's participation weight counts the versions since)
    ft:fed:{fed}:evaluations     hash version -> JSON evaluation (perplexities, forgetting ratio);
                                 an entry goes with its round's info hash
    ft:fed:{fed}:round:{r}       hash: status, base_version, opened_at, deadline, cohort, reason, ...;
                                 kept for Settings.history_rounds rounds (FLEETTUNE_HISTORY_ROUNDS)
    ft:fed:{fed}:round:{r}:cohort   set of device ids selected for round r
    ft:fed:{fed}:round:{r}:updates  hash device_id -> msgpack UpdateRecord (HSETNX: once per device)
    ft:fed:{fed}:round:{r}:reported set of cohort devices with a final outcome (accepted or rejected)
    ft:fed:{fed}:round:{r}:inflight counter: messages the gateway took on time that have no outcome yet
    ft:fed:{fed}:round:{r}:claims   sorted set device_id -> its (capped) sample count: the round's median claim
    ft:fed:{fed}:round:{r}:uncapped set of devices accepted before the round's weight cap was known
    ft:fed:{fed}:round:{r}:unfolded set of accepted devices whose update is in no committed partial yet
    ft:fed:{fed}:round:{r}:partials hash partial slot -> msgpack entry (object key, sha256, counts, stats)
    ft:fed:{fed}:stats           hash of counters: received, accepted, duplicate, rejected:{reason}
    ft:fed:{fed}:secret          32 random bytes only the server knows: seeds DP noise and cohort sampling
    ft:fed:{fed}:identities      hash device_id -> its Ed25519 identity public key (secure aggregation)
    ft:fed:{fed}:round:{r}:secagg           hash: the SecAgg+ attempt, stage, deadline, graph, encoding, result
    ft:fed:{fed}:round:{r}:secagg:{a}:{s}   hash device_id -> its checked message of stage s in attempt a
                                            (s = advertise | share | inbox | masked | consistency | unmask)
    ft:fed:{fed}:*               every key of one federation (what deleting it removes)
    ft:federations               set of federation names
    ft:stats                     counters of envelopes that name no parseable federation
    ft:starts:due                sorted set federation -> when a start was asked, until a worker did it
    ft:redrive:lock              one ledger re-drive at a time, whichever worker's beat sweeps
    ft:msg:{sha256}              outcome of one envelope, so redelivery is answered, not recounted;
                                 expires after Settings.message_ttl_s (FLEETTUNE_MESSAGE_TTL)
    ft:deadletter                stream of rejected updates, capped at Settings.deadletter_maxlen
    ft:beat:leader               the beat leader lease: the owner's id, expiring unless renewed
    ft:retention                 sorted set "{fed}:{round}" -> when its update objects and per-round
                                 sets may be deleted (published versions are kept for good)
    ft:heartbeats                hash process kind (beat) -> last time it was seen alive
    ft:evaluations:due           sorted set "{fed}:{version}" -> publish time, until its evaluation is recorded
    ft:distill:due               sorted set "{fed}:{version}:{tier}" -> when asked, until that distillation is done
    ft:exports:due               sorted set "{fed}:{version}:{format}" -> when asked, until that export is ready or failed
    ft:fed:{fed}:exports         hash "{version}:{format}" -> JSON: the export's status, reason, attempts, record
    ft:fed:{fed}:exported:{format}  sorted set of versions with a ready export in a format (score: the version)

Control plane (the API):
    ft:auth:keys                 set of operator API key ids
    ft:auth:key:{id}             hash: digest (sha256 of the secret), scope, name, created_at, revoked_at
    ft:auth:dev:{id}             hash: digest, federation, device, created_at, revoked_at
    ft:fed:{fed}:tokens          hash device_id -> its current device token id
    ft:fed:{fed}:group:{name}    set of device ids (a static device group)
    ft:fed:{fed}:groups          set of group names
    ft:fed:{fed}:group-specs     hash group -> msgpack GroupSpec (kind, rules, exclude); absent: static
    ft:fed:{fed}:group:{name}:matched  set of devices a dynamic or hybrid group matched at their last check-in
    ft:fed:{fed}:deployment      JSON: tier -> the model variant its devices run (cascading tiers)
    ft:fed:{fed}:distilled:{tier}  sorted set of versions distilled for a tier (score: the version)
    ft:fed:{fed}:split           JSON SplitConfig (split learning: the cut, DP at the cut, bounds)
    ft:fed:{fed}:split:state     hash: version (of the server part), steps, rejected:{reason}
    ft:fed:{fed}:split:steps     hash device -> split steps it ran (its accountant's step count)
    ft:fed:{fed}:rollouts        sorted set rollout id -> created_at
    ft:fed:{fed}:rollout:{id}    JSON: one canary rollout (version, percentage, status, gates, history)
    ft:fed:{fed}:rollout:{id}:reports:{version}  hash device -> msgpack: its latest quality report
    ft:fed:{fed}:rollout:{id}:events   counter of reports received (when the gates look again)
    ft:session:{id}              hash: one training session (federation, rounds, who, when, stopped)
    ft:sessions                  sorted set of session ids by creation time
    ft:rcv:{digest}              msgpack: the gateway's received-message ledger entry (envelope,
                                 received_at, federation, device, round); expires after message_ttl_s
    ft:received:pending          sorted set digest -> when to re-drive it if it still has no outcome
    ft:redrives                  hash digest -> times re-driven (until settled)
    ft:rate:{token}:{window}     request counter of one device token in one rate-limit window (expires)
    ft:signing-key               the HMAC key of the local store's presigned URLs (embedded mode)
    ft:split-secret              what the gateway shows the split server it forwards devices' steps to
    ft:model:{id}                hash: one registry model (kind, current version, created_at)
    ft:model:{id}:versions       hash version -> JSON (sha256, size, formats, object key, status)
    ft:models                    set of model ids

Object store:
    updates/{fed}/{round:06d}/{device}.safetensors        written by devices
    partials/{fed}/{round:06d}/{slot}-{gen:06d}.safetensors   partial sums written by ingest workers
    secagg/{fed}/{round:06d}/{attempt}/{device}.bin       secure aggregation: masked inputs written by devices
    federations/{fed}/versions/{version:06d}/...          immutable published versions
    federations/{fed}/versions/{version:06d}/rank-{rank}/ that version's adapter at a tier's lower rank
    federations/{fed}/versions/{version:06d}/tier-{tier}/ that version distilled onto a tier's own base
    federations/{fed}/versions/{version:06d}/exports/{format}.json  that version's export record (immutable)
    exports/base/{digest}/{format}/...                    a base exported once per base model and adapter layout
                                                          (LoRA tensors are its inputs: versions ship only them)
    federations/{fed}/current.json                        pointer to the current version
    federations/{fed}/split/{version:06d}/...             the split server's part, versioned on its own
    models/{model}/{version}/{filename}                   registry artifacts (immutable)
"""

from __future__ import annotations

import re

from fleettune.shared.errors import RejectReason, Rejected

PREFIX = "ft"
MESSAGE_TTL_S = 7 * 24 * 3600
GLOBAL_STATS = f"{PREFIX}:stats"  # counters for envelopes that name no parseable federation
FEDERATIONS = f"{PREFIX}:federations"
DEADLETTER = f"{PREFIX}:deadletter"

# The id rule, written once (federations, devices, groups, tiers, model paths): ids become parts of
# Redis keys and object paths, so no slashes, no "..", an alphanumeric first character, at most 64
# characters. No lookahead, so JSON Schema (ECMA), pydantic (Rust) and `re` read it alike.
ID_MAX_LENGTH = 64
ID_RULE = r"[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?"
ID_PATTERN = f"^{ID_RULE}$"
_ID = re.compile(ID_RULE)


def valid_id(value: object) -> bool:
    return isinstance(value, str) and len(value) <= ID_MAX_LENGTH and bool(_ID.fullmatch(value))


def check_id(value: object, what: str) -> str:
    if not valid_id(value):
        raise Rejected(RejectReason.MALFORMED_ENVELOPE, f"{what} is not a valid id")
    return value  # type: ignore[return-value]


def fed_config(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:config"


def fed_config_revision(fed: str, revision: int) -> str:
    return f"{PREFIX}:fed:{fed}:config:{revision}"


def fed_config_pending(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:config:pending"


def fed_state(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:state"


def fed_devices(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:devices"


def fed_profiles(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:profiles"


def fed_evaluations(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:evaluations"


def fed_async_bases(fed: str) -> str:
    """Async rounds: device -> the newest base version it has an accepted update from."""
    return f"{PREFIX}:fed:{fed}:async_bases"


def fed_async_joined(fed: str) -> str:
    """Async rounds: device -> the base version of the last buffer its update joined."""
    return f"{PREFIX}:fed:{fed}:async_joined"


def fed_stats(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:stats"


def fed_secret(fed: str) -> str:
    """32 random bytes only the server knows: seeds DP noise and cohort sampling (never sent out)."""
    return f"{PREFIX}:fed:{fed}:secret"


def round_info(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}"


def round_cohort(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:cohort"


def round_updates(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:updates"


def round_inflight(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:inflight"


def round_reported(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:reported"


def round_claims(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:claims"


def round_uncapped(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:uncapped"


def round_unfolded(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:unfolded"


def round_partials(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:partials"


def round_partials_prefix(fed: str, round_no: int) -> str:
    return f"partials/{fed}/{round_no:06d}/"


def partial_object(fed: str, round_no: int, slot: str, gen: int) -> str:
    return f"{round_partials_prefix(fed, round_no)}{slot}-{gen:06d}.safetensors"


def fed_keys_pattern(fed: str) -> str:
    """Every Redis key of one federation (for deleting it)."""
    return f"{PREFIX}:fed:{fed}:*"


def message(digest: str) -> str:
    return f"{PREFIX}:msg:{digest}"


def update_object(fed: str, round_no: int, device: str) -> str:
    return f"{round_updates_prefix(fed, round_no)}{device}.safetensors"


def round_updates_prefix(fed: str, round_no: int) -> str:
    return f"updates/{fed}/{round_no:06d}/"


def version_prefix(fed: str, version: int) -> str:
    return f"federations/{fed}/versions/{version:06d}"


def tier_prefix(fed: str, version: int, rank: int) -> str:
    """A version's adapter at a tier's lower rank (heterogeneous ranks), beside the global one."""
    return f"{version_prefix(fed, version)}/rank-{rank}"


def variant_prefix(fed: str, version: int, tier: str) -> str:
    """A version distilled for a tier that runs another base model (cascading tiers), beside the global one."""
    return f"{version_prefix(fed, version)}/tier-{tier}"


def current_pointer(fed: str) -> str:
    return f"federations/{fed}/current.json"


API_KEYS = f"{PREFIX}:auth:keys"
EVALUATIONS_DUE = f"{PREFIX}:evaluations:due"
DISTILL_DUE = f"{PREFIX}:distill:due"
EXPORTS_DUE = f"{PREFIX}:exports:due"
STARTS_DUE = f"{PREFIX}:starts:due"  # federations whose requested start (v0, next round) no worker has done yet
HEARTBEATS = f"{PREFIX}:heartbeats"
BEAT_LEADER = f"{PREFIX}:beat:leader"
REDRIVE_LOCK = f"{PREFIX}:redrive:lock"  # one ledger re-drive at a time, whichever worker sweeps
RECEIVED_PENDING = f"{PREFIX}:received:pending"
RETENTION = f"{PREFIX}:retention"
REDRIVES = f"{PREFIX}:redrives"
SESSIONS = f"{PREFIX}:sessions"
SIGNING_KEY = f"{PREFIX}:signing-key"
SPLIT_SECRET = f"{PREFIX}:split-secret"
MODELS = f"{PREFIX}:models"


def api_key(key_id: str) -> str:
    return f"{PREFIX}:auth:key:{key_id}"


def device_token(key_id: str) -> str:
    return f"{PREFIX}:auth:dev:{key_id}"


def fed_device_tokens(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:tokens"


def fed_group(fed: str, group: str) -> str:
    return f"{PREFIX}:fed:{fed}:group:{group}"


def fed_groups(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:groups"


def fed_group_specs(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:group-specs"


def fed_group_matched(fed: str, group: str) -> str:
    return f"{PREFIX}:fed:{fed}:group:{group}:matched"


def fed_deployment(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:deployment"


def fed_distilled(fed: str, tier: str) -> str:
    return f"{PREFIX}:fed:{fed}:distilled:{tier}"


def fed_exports(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:exports"


def fed_exported(fed: str, fmt: str) -> str:
    return f"{PREFIX}:fed:{fed}:exported:{fmt}"


def export_record(fed: str, version: int, fmt: str) -> str:
    return f"{version_prefix(fed, version)}/exports/{fmt}.json"


def export_base_prefix(digest: str, fmt: str) -> str:
    return f"exports/base/{digest}/{fmt}"


def fed_split(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:split"


def split_state(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:split:state"


def split_steps(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:split:steps"


def split_prefix(fed: str, version: int) -> str:
    """A published version of a split federation's server part (its layers' LoRA)."""
    return f"federations/{fed}/split/{version:06d}"


def fed_rollouts(fed: str) -> str:
    return f"{PREFIX}:fed:{fed}:rollouts"


def rollout(fed: str, rollout_id: str) -> str:
    return f"{PREFIX}:fed:{fed}:rollout:{rollout_id}"


def rollout_events(fed: str, rollout_id: str) -> str:
    return f"{PREFIX}:fed:{fed}:rollout:{rollout_id}:events"


def rollout_reports(fed: str, rollout_id: str, version: int) -> str:
    return f"{PREFIX}:fed:{fed}:rollout:{rollout_id}:reports:{version}"


def session(session_id: str) -> str:
    return f"{PREFIX}:session:{session_id}"


def received(digest: str) -> str:
    return f"{PREFIX}:rcv:{digest}"


def rate_window(token_id: str, window: int) -> str:
    """One token's requests in one window (a token belongs to one device of one federation)."""
    return f"{PREFIX}:rate:{token_id}:{window}"


def model(model_id: str) -> str:
    return f"{PREFIX}:model:{model_id}"


def model_versions(model_id: str) -> str:
    return f"{PREFIX}:model:{model_id}:versions"


def model_object(model_id: str, version: str, filename: str) -> str:
    return f"models/{model_id}/{version}/{filename}"


def fed_identities(fed: str) -> str:
    """Each device's Ed25519 identity public key: it signs the device's secure-aggregation keys."""
    return f"{PREFIX}:fed:{fed}:identities"


def secagg(fed: str, round_no: int) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:secagg"


def secagg_stage(fed: str, round_no: int, attempt: int, stage: str) -> str:
    return f"{PREFIX}:fed:{fed}:round:{round_no}:secagg:{attempt}:{stage}"


def secagg_masked_prefix(fed: str, round_no: int) -> str:
    return f"secagg/{fed}/{round_no:06d}/"


def secagg_masked_object(fed: str, round_no: int, attempt: int, device: str) -> str:
    """A device's masked input for one attempt: uniform-looking integers mod 2^32 or 2^64."""
    return f"{secagg_masked_prefix(fed, round_no)}{attempt}/{device}.bin"
