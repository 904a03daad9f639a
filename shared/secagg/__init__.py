"""Secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the sum of a cohort's updates.

    messages     the attempt's context, stage message parsing, named refusal reasons
    primitives   Ed25519, X25519, HKDF, ChaCha20-Poly1305 and ChaCha20 masks (all `cryptography`)
    shamir       t-of-n sharing of 32-byte secrets over GF(2^521 - 1)
    graph        the k-regular neighbour graph over a secret-keyed shuffle of the cohort
    fixed_point  [w, w·x] mod 2^32 or 2^64, sized so the sum cannot wrap
    device       one device's session: keys, shares, masked input, its unmasking answer
    server       the server's checks, what it relays, and the unmasking
    simulation   every stage in memory, with dropouts: the reference the pipeline is tested against
"""
