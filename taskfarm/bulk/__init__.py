"""The bulk-data channel: big values beside the Foolscap control plane.

`channel` is the protocol (TLS with the controller Tub's certificate,
one-time capabilities, no policy); `policy` decides what travels over it.
"""
