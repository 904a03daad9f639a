"""Secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the sum of a cohort's updates.

    config       the federation's setting (`"secure_aggregation": {...}`) and what it refuses
    messages     the attempt's context, stage message parsing, named refusal reasons
    primitives   Ed25519, X25519, HKDF, ChaCha20-Poly1305 and ChaCha20 masks (all `cryptography`)
    shamir       t-of-n sharing of 32-byte secrets over GF(2^521 - 1)
    graph        the k-regular neighbour graph over a secret-keyed shuffle of the cohort
    fixed_point  [w, w·x] mod 2^32 or 2^64, sized so the sum cannot wrap (and distributed DP's noise)
    device       one device's session: keys, shares, masked input, consistency, its unmasking answer
    server       the server's checks, what it relays, the unmasking and the check of the sum
    coordinator  the stages as state in Redis: deadlines, restarts, the unmasking in the close
    participant  a device's part over the gateway, one step at a time
    simulation   every stage in memory, with dropouts: the reference for tests and the bench
"""
