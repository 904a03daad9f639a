"""The wire protocol devices and server share: the envelope, the adapter spec, the strict
safetensors reader, published versions and the encoding of an update.
"""
